"""The report on hand-made evaluation folders: Findings first, paired CIs, held-out accuracy, the control."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pandas as pd

from dpo_core.config import EvalConfig
from dpo_core.evaluate import aggregate, bucket_of
from dpo_core.report import ReportEntry, held_out_rows, write_report

NUM_PROMPTS = 30
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _eval_folder(folder: Path, shift: float, rng: np.random.Generator, config: EvalConfig,
                 quality_shift: float = 0.0, fluency_shift: float = 0.0) -> str:
    """Per-prompt scores with embedding_distance shifted by `shift`, and 4 samples per prompt."""
    creativity = np.linspace(0.0, 0.99, NUM_PROMPTS)
    base = np.random.default_rng(7)  # the same per-prompt baseline for every model: a paired design
    scores = pd.DataFrame({
        "prompt_id": [f"{i:03d}" for i in range(NUM_PROMPTS)], "creativity_score": creativity,
        "bucket": [bucket_of(c, config.bucket_edges) for c in creativity],
        "embedding_distance": base.uniform(0.3, 0.6, NUM_PROMPTS) + shift + rng.normal(0, 0.005, NUM_PROMPTS),
        "vendi": base.uniform(1.5, 3.0, NUM_PROMPTS) + rng.normal(0, 0.01, NUM_PROMPTS),
        "quality_judge": base.uniform(4, 7, NUM_PROMPTS) + rng.normal(0, 0.05, NUM_PROMPTS),
        "quality_logprob": base.uniform(-3, -2, NUM_PROMPTS) + fluency_shift + rng.normal(0, 0.01, NUM_PROMPTS),
        "mean_words": np.full(NUM_PROMPTS, 6.0), "mean_tokens": np.full(NUM_PROMPTS, 9.0),
        # the quality-aware metrics move with `quality_shift` (a quality-preserving gain when positive)
        "utility_k": np.clip(base.uniform(0.4, 0.6, NUM_PROMPTS) + quality_shift, 0, 1),
        "distinct_k": base.integers(1, 4, NUM_PROMPTS) + (quality_shift > 0),
        "effective_vendi": base.uniform(1.0, 2.0, NUM_PROMPTS) + 10 * quality_shift,
        "valid_rate": np.clip(base.uniform(0.5, 0.9, NUM_PROMPTS) + quality_shift, 0, 1),
        "completion_rate": np.full(NUM_PROMPTS, 0.5)})
    samples = [{"prompt_id": pid, "sample_index": k, "num_tokens": 9,
                "text": " ".join(rng.choice(WORDS, 6))} for pid in scores["prompt_id"] for k in range(4)]
    folder.mkdir(parents=True)
    scores.to_parquet(folder / "scores.parquet", index=False)
    (folder / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    summary = {"num_prompts": NUM_PROMPTS, "eval_config": config.model_dump(mode="json"), **aggregate(scores, config)}
    (folder / "summary.json").write_text(json.dumps(summary))
    return str(folder)


def _run_folder(folder: Path, held_margins: list[float]) -> str:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 0, "split": "train_batch", "dpo_loss": 0.69,
                                                      "accuracy": 0.5, "margin": 0.0}) + "\n")
    margins = np.asarray(held_margins)
    rows = [{"name": "initial", "step": 0, "dpo_loss": 0.693, "accuracy": 0.0, "margin": 0.0,
             "num_pairs": len(margins), "margins": [0.0] * len(margins)},
            {"name": "final", "step": 9, "dpo_loss": float(np.mean(np.logaddexp(0, -margins))),
             "accuracy": float(np.mean(margins > 0)), "margin": float(margins.mean()), "num_pairs": len(margins),
             "margins": margins.tolist()}]
    (folder / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def _entries(tmp_path: Path) -> list[ReportEntry]:
    config, rng = EvalConfig(), np.random.default_rng(0)
    setting = {"model_name": "m", "learning_rate": 1e-4, "dpo_beta": 0.1}
    entries = [ReportEntry(label="m (base)", model_name="m", eval_dir=_eval_folder(tmp_path / "base", 0.0, rng, config))]
    for dataset, shift, margins in (("1", 0.0, [0.2] * 8), ("2", 0.0, [0.2] * 6 + [-0.1] * 2),
                                    ("control_diversity.parquet", 0.08, [0.3] * 8)):
        name = f"run{len(entries)}"
        entries.append(ReportEntry(label=name, dataset=dataset, run_dir=_run_folder(tmp_path / name, margins),
                                   eval_dir=_eval_folder(tmp_path / f"eval{name}", shift, rng, config), **setting))
    return entries


def test_report_opens_with_findings_held_out_accuracy_and_the_control(tmp_path):
    report = write_report(_entries(tmp_path), tmp_path / "report")
    text = report.read_text()
    header_end = text.index("## Findings")
    assert "## Overall" not in text[:header_end] and text.index("## Overall") > header_end
    findings = text[header_end:text.index("## Overall")]
    assert "### Dataset 1 (embedding diversity)" in findings and "### Positive controls" in findings
    assert "Degeneration control `run3`: the instrument detected a diversity change vs base (embedding_distance" in findings
    assert "quality (quality_judge)" in findings and "dataset 2's own selection signal" in findings
    paired = pd.read_csv(tmp_path / "report" / "paired.csv")
    control = paired[(paired["model"] == "run3") & (paired["metric"] == "embedding_distance")
                     & (paired["scope"] == "all") & (paired["versus"] == "base")].iloc[0]
    assert 0.07 < control["ci_low"] < 0.08 < control["ci_high"] < 0.09 and control["significant"]
    assert {"lc_distinct_1", "lc_self_bleu"} <= set(paired["metric"])  # the length-controlled view
    assert (tmp_path / "report" / "paired_vs_base.png").exists()
    assert (tmp_path / "report" / "paired_vs_dataset2.png").exists()
    assert "### Held-out DPO accuracy" in findings and "### Length" in findings


def test_held_out_accuracy_ci_says_whether_it_is_above_chance(tmp_path):
    held = held_out_rows(_entries(tmp_path)).set_index("dataset")
    assert held.loc["1", "accuracy"] == 1.0 and held.loc["1", "above_chance"]
    assert held.loc["2", "accuracy"] == 0.75 and held.loc["2", "accuracy_ci_low"] <= 0.5
    assert not held.loc["2", "above_chance"] and held.loc["1", "initial_accuracy"] == 0.0


def test_findings_lead_with_quality_aware_sentences_a_compact_table_and_name_degeneration(tmp_path):
    """The degeneration control raises raw embedding distance while validity falls: labelled as such. The
    quality-preserving control raises utility_k: detected. Dataset 1 moves nothing: no claim."""
    config, rng = EvalConfig(), np.random.default_rng(0)
    setting = {"model_name": "m", "learning_rate": 1e-4, "dpo_beta": 0.1}
    entries = [ReportEntry(label="m (base)", model_name="m", eval_dir=_eval_folder(tmp_path / "base", 0.0, rng, config))]
    for dataset, shift, quality_shift in (("1", 0.0, 0.0), ("2", 0.0, 0.0),
                                          ("control_diversity.parquet", 0.08, -0.3),
                                          ("control_quality.parquet", 0.0, 0.1)):
        name = f"run{len(entries)}"
        entries.append(ReportEntry(label=name, dataset=dataset, run_dir=_run_folder(tmp_path / name, [0.2] * 8),
                                   eval_dir=_eval_folder(tmp_path / f"eval{name}", shift, rng, config,
                                                         quality_shift), **setting))
    text = write_report(entries, tmp_path / "report").read_text()
    headline = text[text.index("## Findings"):text.index("### Details")]
    sentences, table = headline.split("| comparison |")
    assert sentences.count(". ") + 1 <= 6 + 1  # at most six sentences (plus the completion-rate line)
    assert "Dataset 1 (embedding diversity) did not change quality-aware diversity vs the base model" in sentences
    assert ("The degeneration control" in sentences and "valid_rate fell" in sentences
            and "diversity through degeneration" in sentences)
    assert "The quality-preserving control (DivPO) raised quality-aware diversity vs the base model: utility_k +0.1" \
        in sentences
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "diversity through degeneration" in rows["The degeneration control vs base"]
    assert "+0.1 ✓" in rows["The quality-preserving control (DivPO) vs base"]
    assert "Dataset 1 (embedding diversity) vs dataset 2" in rows
    assert "Samples that ended on their own before max_tokens 128" in headline
    controls = text[text.index("### Positive controls"):]
    assert "Quality-preserving control `run4`" in controls and "it detected more diversity" in controls
    assert "Degeneration control `run3`" in controls and "reading: diversity through degeneration" in controls


def test_a_quality_aware_gain_at_lower_fluency_is_not_called_degeneration(tmp_path):
    """Raw diversity up and mean fluency down, but utility_k (valid samples only) and valid_rate up: more
    diversity among acceptable answers that the base model finds less likely, e.g. a diversity-eliciting prompt."""
    config, rng = EvalConfig(), np.random.default_rng(0)
    entries = [ReportEntry(label="m (base)", model_name="m", eval_dir=_eval_folder(tmp_path / "base", 0.0, rng, config)),
               ReportEntry(label="run1", dataset="1", model_name="m", learning_rate=1e-4, dpo_beta=0.1,
                           run_dir=_run_folder(tmp_path / "run1", [0.2] * 8),
                           eval_dir=_eval_folder(tmp_path / "eval1", 0.08, rng, config, quality_shift=0.1,
                                                 fluency_shift=-0.5))]
    text = write_report(entries, tmp_path / "report").read_text()
    headline = text[text.index("## Findings"):text.index("### Details")]
    assert "Dataset 1 (embedding diversity) raised quality-aware diversity vs the base model: utility_k +0.1" in headline
    assert "its quality_logprob fell" in headline and "not degeneration" in headline
    row = next(line for line in headline.splitlines() if line.startswith("| Dataset 1 (embedding diversity) vs base"))
    assert row.endswith("| more quality-aware diversity, lower quality_logprob |"), row


def test_a_loss_type_sweep_reports_each_loss_as_its_own_condition(tmp_path):
    """Two runs of dataset 1 that differ only in loss_type: two headline claims, each named with its loss, and
    the overall table shows the loss of each run."""
    config, rng = EvalConfig(), np.random.default_rng(0)
    entries = [ReportEntry(label="m (base)", model_name="m", eval_dir=_eval_folder(tmp_path / "base", 0.0, rng, config))]
    for loss, quality_shift in (("sigmoid", 0.0), ("ipo", 0.1)):
        entries.append(ReportEntry(label=f"run-{loss}", dataset="1", model_name="m", learning_rate=1e-4,
                                   dpo_beta=0.1, loss_type=loss, seed=0,
                                   run_dir=_run_folder(tmp_path / f"run-{loss}", [0.2] * 8),
                                   eval_dir=_eval_folder(tmp_path / f"eval-{loss}", 0.0, rng, config, quality_shift)))
    text = write_report(entries, tmp_path / "report").read_text()
    headline = text[text.index("## Findings"):text.index("### Details")]
    assert "Dataset 1 (embedding diversity) [loss ipo] raised quality-aware diversity" in headline
    assert "Dataset 1 (embedding diversity) [loss sigmoid] did not change quality-aware diversity" in headline
    # completion rates per condition, not pooled over the two losses
    assert "dataset 1 · loss sigmoid 50%; dataset 1 · loss ipo 50%" in headline
    overall = text[text.index("## Overall"):]
    assert "| m | 1 | 0.0001 | 0.1 | ipo |" in overall and "| m | 1 | 0.0001 | 0.1 | sigmoid |" in overall


def test_a_report_can_be_rebuilt_from_its_entries_without_sampling(tmp_path, capsys):
    """The report folder records what it was made of (entries.json); `python -m dpo_core report` rebuilds the same
    report from it, and names the entry whose evaluation is gone."""
    from dpo_core.__main__ import main

    first = write_report(_entries(tmp_path), tmp_path / "report")
    assert main(["report", str(tmp_path / "report"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == first.read_text()
    assert "nothing sampled" in capsys.readouterr().out

    (tmp_path / "evalrun2" / "scores.parquet").unlink()
    assert main(["report", str(tmp_path / "report")]) == 1
    error = capsys.readouterr().err
    assert "entries.json: entry 2 (run2): eval folder" in error and "lacks scores.parquet" in error
    assert (tmp_path / "report" / "report.md").read_text() == first.read_text()  # nothing half-written
    (tmp_path / "run1" / "metrics.jsonl").unlink()
    assert main(["report", str(tmp_path / "report")]) == 1
    assert "entry 1 (run1): run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_the_published_study_rebuilds_from_its_evaluations_and_says_what_the_readme_quotes(tmp_path, monkeypatch):
    """results/study-3seed ships the evaluations its report is made of: rebuilt with this code, the headline
    still says what README.md quotes (no dataset moved utility_k; the DivPO control was not detected)."""
    from dpo_core.__main__ import main

    study = Path(__file__).resolve().parents[2] / "results" / "study-3seed"
    monkeypatch.chdir(study)  # entries.json's paths are relative to the folder the suite ran in
    assert main(["report", "report", "--out", str(tmp_path / "rebuilt")]) == 0
    headline = (tmp_path / "rebuilt" / "report.md").read_text().split("### Details")[0]
    for claim in ("Dataset 1 (embedding diversity) did not change quality-aware diversity vs the base model "
                  "measurably: utility_k -0.0298",
                  "Dataset 2 (quality) did not change quality-aware diversity vs the base model measurably: "
                  "utility_k -0.158",
                  "The quality-preserving control (DivPO) did not change quality-aware diversity vs the base model "
                  "measurably: utility_k -0.0812",
                  "raised quality-aware diversity vs the base model: utility_k +0.219"):
        assert claim in headline, claim
