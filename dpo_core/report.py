"""The comparison report: datasets x models x hyperparameters against the base models, by creativity bucket.

Writes `report.md`, `table.csv` (every number in the report, one row per evaluated model), `paired.csv` (every
paired test of the Findings) and PNG plots into one folder. The report opens with **Findings**: each trained
model vs its base model and vs the dataset-2 model, paired prompt by prompt (dpo_core.findings), the held-out
DPO accuracy of every run with a CI, and whether the positive control was detected. The per-model tables come
from the evaluations' `summary.json`, computed from their `scores.parquet` (per prompt).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from dpo_core import findings, stats
from dpo_core.checkpoints import read_jsonl
from dpo_core.config import EvalConfig, FrozenModel
from dpo_core.data import CONTROL_DATASET_FILES, CONTROL_NAMES, CONTROL_QUALITY_FILE, DATASET_CRITERIA, PROMPT_BASELINE
from dpo_core.diversity import HIGHER_IS_MORE_DIVERSE
from dpo_core.fsutil import atomic_folder
from dpo_core.evaluate import BUCKETS, EVAL_FILES

DIVERSITY = ("embedding_distance", "vendi", "distinct_1", "distinct_2", "self_bleu", "compression_ratio")
PLOTTED = ("utility_k", "effective_vendi", "embedding_distance", "distinct_2")
QUALITY_AWARE_COLUMNS = ("utility_k", "distinct_k", "effective_vendi", "valid_rate", "completion_rate")


class ReportEntry(FrozenModel):
    """One evaluated model: a base model (run_dir None) or an experiment's final checkpoint."""

    label: str
    model_name: str
    eval_dir: str
    dataset: str | None = None
    learning_rate: float | None = None
    dpo_beta: float | None = None
    loss_type: str | None = None
    run_dir: str | None = None
    seed: int | None = None  # the training seed (the suite's seeds=N replicates share everything else)


def _fmt(stat: dict[str, float] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None or pd.isna(stat["mean"]):
        return "-"
    return f"{stat['mean']:.{digits}f} [{stat['ci_low']:.{digits}f}, {stat['ci_high']:.{digits}f}]"


def build_table(entries: Sequence[ReportEntry]) -> pd.DataFrame:
    """One row per entry: every metric overall and per bucket (mean, CI), quality, final DPO accuracy/margin."""
    rows = []
    for entry in entries:
        summary = json.loads((Path(entry.eval_dir) / "summary.json").read_text())
        row: dict[str, Any] = {"label": entry.label, "model": entry.model_name, "dataset": entry.dataset or "base",
                               "learning_rate": entry.learning_rate, "dpo_beta": entry.dpo_beta, "loss_type": entry.loss_type,
                               "seed": entry.seed}
        for scope, stats in [("all", summary["overall"])] + [(b, summary["buckets"].get(b, {})) for b in BUCKETS]:
            for metric, stat in stats.items():
                if isinstance(stat, dict):
                    row[f"{metric}/{scope}"] = stat["mean"]
                    row[f"{metric}/{scope}/ci_low"] = stat["ci_low"]
                    row[f"{metric}/{scope}/ci_high"] = stat["ci_high"]
        final = read_jsonl(Path(entry.run_dir) / "metrics.jsonl")[-1] if entry.run_dir else {}
        row["dpo/accuracy"] = final.get("accuracy")
        row["dpo/margin"] = final.get("margin")
        row["dpo/loss"] = final.get("dpo_loss")
        rows.append(row)
    return pd.DataFrame(rows)


def _stat(row: pd.Series, metric: str, scope: str) -> dict[str, float] | None:
    key = f"{metric}/{scope}"
    if key not in row or pd.isna(row[key]):
        return None
    return {"mean": row[key], "ci_low": row[f"{key}/ci_low"], "ci_high": row[f"{key}/ci_high"]}


ENTRIES_FILE = "entries.json"


class ReportInputError(ValueError):
    """A report folder whose entries cannot be read back, or whose evaluations are gone."""


def read_entries(report_dir: Path) -> tuple[list[ReportEntry], list[str]]:
    """The evaluated models (and notes) a report was written from: its `entries.json`, each eval folder checked."""
    path = Path(report_dir) / ENTRIES_FILE
    if not path.exists():
        raise ReportInputError(f"{path}: not found; only reports written since entries.json was added can be "
                               "rebuilt (run the suite again to write one)")
    try:
        saved = json.loads(path.read_text())
        entries = [ReportEntry(**row) for row in saved["entries"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReportInputError(f"{path}: not a dpo-suite report's entries ({exc})") from exc
    for index, entry in enumerate(entries):
        missing = [name for name in EVAL_FILES if not (Path(entry.eval_dir) / name).exists()]
        missing_run = [name for name in ("metrics.jsonl",)
                       if entry.run_dir and not (Path(entry.run_dir) / name).exists()]
        if missing_run:
            raise ReportInputError(f"{path}: entry {index} ({entry.label}): run folder {entry.run_dir} lacks "
                                   f"{', '.join(missing_run)}; run from the folder the suite ran in (its paths "
                                   "are relative to it)")
        if missing:
            raise ReportInputError(f"{path}: entry {index} ({entry.label}): eval folder {entry.eval_dir} lacks "
                                   f"{', '.join(missing)}; run from the folder the suite ran in (its paths are "
                                   "relative to it), or evaluate that model again")
    return entries, list(saved.get("notes") or [])


def write_report(entries: Sequence[ReportEntry], out_dir: Path, title: str = "dpo-suite: output diversity",
                 notes: Sequence[str] | None = None) -> Path:
    """Write the report folder (atomically: built in a temp folder, then renamed). Returns report.md's path.
    `notes` (e.g. the suite's model replacements) are listed under the title."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        # What the report was made of, so `python -m dpo_core report DIR` can rebuild it with later code.
        (tmp / ENTRIES_FILE).write_text(json.dumps(
            {"entries": [entry.model_dump(mode="json") for entry in entries], "notes": list(notes or [])}, indent=1))
        table = build_table(entries)
        table.to_csv(tmp / "table.csv", index=False)
        section, finding_plots = findings_section(entries, tmp)
        plots = finding_plots + _plots(entries, table, tmp)
        (tmp / "report.md").write_text(_with_notes(_markdown(entries, table, plots, title, section), notes))
    return out_dir / "report.md"


def is_control(entry: ReportEntry) -> bool:
    """A positive control: a run on a control dataset (pairs built to change diversity strongly)."""
    return bool(entry.dataset) and Path(str(entry.dataset)).name in CONTROL_DATASET_FILES


def control_kind(entry: ReportEntry) -> str:
    """"quality-preserving" (DivPO's pairs) or "degeneration" (most vs least diverse, no quality filter)."""
    return "quality-preserving" if Path(str(entry.dataset)).name == CONTROL_QUALITY_FILE else "degeneration"


def dataset_names(entries: Sequence[ReportEntry]) -> dict[str, str]:
    """What each entry's dataset is, for the findings: 'Dataset 1 (embedding diversity)', the prompting
    baseline, the controls."""
    names = {str(k): f"Dataset {k} ({v})" for k, v in DATASET_CRITERIA.items()}
    names[PROMPT_BASELINE] = "The prompting baseline (base model + diversity instruction, no training)"
    for entry in entries:
        if entry.dataset and Path(str(entry.dataset)).name in CONTROL_NAMES:
            names[str(entry.dataset)] = "The " + CONTROL_NAMES[Path(str(entry.dataset)).name]
    return names


def _completion_lines(entries: Sequence[ReportEntry], scores: dict[str, pd.DataFrame],
                      config: dict[str, Any]) -> list[str]:
    """How many samples ended on their own (the rest were cut at max_tokens and count as invalid)."""
    several_models = len({e.model_name for e in entries}) > 1
    varying = findings.varying_settings(entries)
    by_condition: dict[str, list[float]] = {}  # a condition's seeds together
    for entry in entries:
        if "completion_rate" in scores[entry.label]:
            name = display_label({"dataset": entry.dataset or "base", "model": entry.model_name,
                                  **{k: getattr(entry, k) for k in varying}}, several_models, varying)
            by_condition.setdefault(name, []).append(float(np.nanmean(scores[entry.label]["completion_rate"])))
    rates = [f"{name} {np.mean(values):.0%}" for name, values in by_condition.items()]
    if not rates:
        return []
    return [f"Samples that ended on their own before max_tokens {config.get('max_tokens', '?')} (the rest are "
            f"cut and count as invalid): {'; '.join(rates)}.", ""]


def _read_samples(eval_dir: Path) -> list[dict[str, Any]]:
    # json.loads per line, not pandas.read_json: that would turn a prompt_id like "007" into the int 7.
    return [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines() if line.strip()]


def held_out_rows(entries: Sequence[ReportEntry], seed: int = 0) -> pd.DataFrame:
    """Per trained run: held-out DPO accuracy (bootstrap 95% CI over the held-out pairs), loss and margin,
    before training and at the last saved checkpoint."""
    rows = []
    for entry in entries:
        path = Path(entry.run_dir) / "held_out.jsonl" if entry.run_dir else None
        if path is None or not path.exists():
            continue
        records = read_jsonl(path)
        if not records:
            continue
        initial, last = records[0], records[-1]
        correct = np.asarray(last["margins"], dtype=float) > 0
        ci_low, ci_high = stats.paired_bootstrap_ci(correct.astype(float), seed=seed)
        rows.append({"label": entry.label, "dataset": entry.dataset, "checkpoint": last["name"],
                     "step": last["step"], "num_pairs": last["num_pairs"], "accuracy": last["accuracy"],
                     "accuracy_ci_low": ci_low, "accuracy_ci_high": ci_high, "dpo_loss": last["dpo_loss"],
                     "margin": last["margin"], "initial_accuracy": initial["accuracy"],
                     "initial_dpo_loss": initial["dpo_loss"], "above_chance": bool(ci_low > 0.5)})
    return pd.DataFrame(rows)


def findings_section(entries: Sequence[ReportEntry], out: Path) -> tuple[str, list[str]]:
    """The Findings markdown (paired comparisons, length, held-out accuracy, positive control) and its plots."""
    config = _eval_config(entries)
    edges, seed = tuple(config.get("bucket_edges", EvalConfig().bucket_edges)), int(config.get("seed", 0))
    scores = {e.label: pd.read_parquet(Path(e.eval_dir) / "scores.parquet") for e in entries}
    samples = {e.label: _read_samples(Path(e.eval_dir)) for e in entries}
    comparisons = findings.plan_comparisons(entries)
    table = findings.paired_table(scores, comparisons, samples=samples, bucket_edges=edges, seed=seed)
    table.to_csv(out / "paired.csv", index=False)
    plots = []
    short = {k: v.split(" (")[0].split(":")[0].replace("The ", "") for k, v in dataset_names(entries).items()}
    for versus, family, name in (
            (findings.VERSUS_BASE, findings.FAMILY_QUALITY_AWARE, "quality_aware_vs_base.png"),
            (findings.VERSUS_BASE, findings.FAMILY_DIVERSITY, "paired_vs_base.png"),
            (f"dataset {findings.QUALITY_DATASET}", findings.FAMILY_DIVERSITY, "paired_vs_dataset2.png")):
        if ((table["versus"] == versus) & (table["family"] == family)).any():
            findings.plot_paired_differences(table, out / name, versus=versus, family=family, names=short)
            plots.append(name)
    controls = [e for e in entries if is_control(e)]
    criteria = {str(k): v for k, v in DATASET_CRITERIA.items()} | {
        str(e.dataset): CONTROL_NAMES[Path(str(e.dataset)).name] for e in controls} | {
        PROMPT_BASELINE: "base model + diversity instruction, no training"}
    markdown = findings.findings_markdown(table, HIGHER_IS_MORE_DIVERSE, dataset_names=criteria,
                                          quality_metric=_quality_metric(scores))
    # The headline first (quality-aware metrics, a few sentences, one table); the per-metric detail below it.
    _, _, details = markdown.partition("\n")
    lines = ["## Findings", "", findings.headline_markdown(table, {k: v.split(":")[0] for k, v in dataset_names(entries).items()}),
             *_completion_lines(entries, scores, config), "### Details: every comparison", details.strip(), ""]
    if controls:
        lines += ["### Positive controls", ""]
        seen: set[str] = set()
        for entry in controls:
            condition = next((r for r in table.itertuples() if r.dataset == entry.dataset), None)
            label = condition.model if condition is not None else entry.label
            if label not in seen:
                seen.add(label)
                lines.append("- " + findings.positive_control_sentence(table, label, kind=control_kind(entry)))
        lines.append("")
    sizes = findings.size_table(scores, comparisons, seed=seed)
    if not sizes.empty:
        sizes.to_csv(out / "model_size.csv", index=False)
        findings.plot_size(sizes, out / "model_size.png", short)
        plots.append("model_size.png")
        lines += ["### Model size", "", "The same dataset trained on each base model: does its effect differ? "
                  "(difference of paired differences, larger − smaller model, 95% CI over prompts and seeds)", "",
                  *(f"- {sentence}" for sentence in findings.size_sentences(sizes, {
                      k: v.split(":")[0] for k, v in dataset_names(entries).items()})), ""]
    lines += _held_out_lines(held_out_rows(entries, seed), out)
    lines += _length_lines(scores, table)
    return "\n".join(lines), plots


def _quality_metric(scores: dict[str, pd.DataFrame]) -> str:
    """The judge's rubric score when every evaluation has it (not dataset 2's selection signal), else fluency."""
    return "quality_judge" if scores and all("quality_judge" in s for s in scores.values()) else "quality_logprob"


def _held_out_lines(held: pd.DataFrame, out: Path) -> list[str]:
    if held.empty:
        return []
    held.to_csv(out / "held_out.csv", index=False)
    lines = ["### Held-out DPO accuracy", "",
             "On each dataset's held-out pairs (a fixed, seeded split, never trained on; rows in each run's "
             "config.json), computed on the saved weights; bootstrap 95% CI over the pairs. Training-batch "
             "metrics are in each run's metrics.jsonl.", "",
             "| run | dataset | pairs | accuracy before | accuracy at checkpoint | loss before → after | margin | "
             "CI above 0.5 |", "|---|---|---|---|---|---|---|---|"]
    for row in held.itertuples():
        lines.append(f"| {row.label} | {row.dataset} | {row.num_pairs} | {row.initial_accuracy:.2f} | "
                     f"{row.accuracy:.2f} [{row.accuracy_ci_low:.2f}, {row.accuracy_ci_high:.2f}] "
                     f"({row.checkpoint}, step {row.step}) | {row.initial_dpo_loss:.3f} → {row.dpo_loss:.3f} | "
                     f"{row.margin:+.3f} | {'yes' if row.above_chance else 'no'} |")
    return lines + [""]


def _length_lines(scores: dict[str, pd.DataFrame], table: pd.DataFrame) -> list[str]:
    """Mean length per model and its paired change vs the base model: a diversity change that is only a length
    change shows up here and in the length-controlled (lc_) rows of paired.csv."""
    from dpo_core.length_control import mean_lengths

    lengths = mean_lengths(scores)
    change = table[(table["metric"] == "mean_words") & (table["scope"] == findings.OVERALL)
                   & (table["versus"] == findings.VERSUS_BASE)].set_index("model")
    lines = ["### Length", "", "| model | mean words | mean tokens | words vs base [95% CI] |", "|---|---|---|---|"]
    for row in lengths.itertuples():
        delta = "-"
        if row.label in change.index:
            c = change.loc[row.label]
            delta = f"{c['difference']:+.1f} [{c['ci_low']:+.1f}, {c['ci_high']:+.1f}]"
        lines.append(f"| {row.label} | {row.mean_words:.1f} | {row.mean_tokens:.1f} | {delta} |")
    return lines + [""]


def _eval_config(entries: Sequence[ReportEntry]) -> dict[str, Any]:
    if not entries:
        return {}
    return json.loads((Path(entries[0].eval_dir) / "summary.json").read_text()).get("eval_config", {})


# --- plan notes (added for issue 13's lineup-aware planning; kept apart from the findings) ---
def _with_notes(markdown: str, notes: Sequence[str] | None) -> str:
    """The suite's plan notes (replaced or skipped models) as a list right under the report's title line."""
    if not notes:
        return markdown
    title, _, rest = markdown.partition("\n")
    block = "\n".join(["", "**Plan notes**", "", *(f"- {note}" for note in notes)])
    return f"{title}\n{block}\n{rest}"


def _markdown(entries: Sequence[ReportEntry], table: pd.DataFrame, plots: list[str], title: str,
              findings_md: str = "") -> str:
    lines = [f"# {title}", ""]
    first = json.loads((Path(entries[0].eval_dir) / "summary.json").read_text()) if entries else {}
    config = first.get("eval_config", {})
    lines += [
        f"{len(entries)} models evaluated on {first.get('num_prompts', '?')} eval prompts, "
        f"k = {config.get('num_samples', '?')} samples each at temperature {config.get('temperature', '?')} "
        f"(seed {config.get('seed', '?')}, max_tokens {config.get('max_tokens', '?')}). Means over prompts with "
        f"bootstrap 95% CIs. Creativity buckets: {_bucket_rule(config)}.", "",
        "Higher is more diverse for " + ", ".join(m for m in DIVERSITY if HIGHER_IS_MORE_DIVERSE[m])
        + "; lower is more diverse for " + ", ".join(m for m in DIVERSITY if not HIGHER_IS_MORE_DIVERSE[m])
        + ". `quality_logprob` is the base model's mean token logprob of the samples (fluency; higher is better).",
        " `quality_judge` is the base model's 1-10 rating under a quality rubric (expected rating from its "
        "next-token distribution): the quality the findings use, since `quality_logprob` is dataset 2's own "
        "selection signal.",
        "", "Datasets: " + "; ".join(f"{n} = {c}" for n, c in DATASET_CRITERIA.items()) + ".", "",
        findings_md, "",
        "## Overall", "",
    ]
    header = ["model", "dataset", "lr", "β", "loss", *QUALITY_AWARE_COLUMNS, *DIVERSITY, "quality_judge", "quality_logprob",
              "mean_tokens", "train-batch DPO acc", "train-batch DPO margin"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for _, row in table.iterrows():
        cells = [row["model"], str(row["dataset"]), _num(row["learning_rate"], "g"), _num(row["dpo_beta"], "g"),
                 row["loss_type"] if isinstance(row["loss_type"], str) else "-"]
        cells += [_fmt(_stat(row, m, "all"), 2) for m in QUALITY_AWARE_COLUMNS]
        cells += [_fmt(_stat(row, m, "all")) for m in DIVERSITY]
        cells += [_fmt(_stat(row, "quality_judge", "all")), _fmt(_stat(row, "quality_logprob", "all")),
                  _fmt(_stat(row, "mean_tokens", "all"), 1),
                  _num(row["dpo/accuracy"], ".2f"), _num(row["dpo/margin"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    for metric in DIVERSITY:
        lines += ["", f"## {metric} by creativity bucket", "",
                  "| model | dataset | lr | β | loss | " + " | ".join(BUCKETS) + " |",
                  "|---|---|---|---|---|" + "---|" * len(BUCKETS)]
        for _, row in table.iterrows():
            cells = [row["model"], str(row["dataset"]), _num(row["learning_rate"], "g"), _num(row["dpo_beta"], "g"),
                     row["loss_type"] if isinstance(row["loss_type"], str) else "-"]
            cells += [_fmt(_stat(row, metric, b)) for b in BUCKETS]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "Files: `table.csv` holds every number above; each model's samples and per-prompt scores are in "
              "its eval folder:", ""] + [f"- {e.label}: `{e.eval_dir}`" for e in entries]
    return "\n".join(lines) + "\n"


def _bucket_rule(eval_config: dict[str, Any]) -> str:
    """The creativity buckets as the evaluation drew them (EvalConfig.bucket_edges, recorded in summary.json)."""
    low, high = eval_config.get("bucket_edges", EvalConfig().bucket_edges)
    return f"low < {low:.3g} <= mid < {high:.3g} <= high"


def _num(value: Any, spec: str) -> str:
    return "-" if value is None or pd.isna(value) else format(value, spec)


def display_label(row: Any, several_models: bool = False, varying: Sequence[str] = ()) -> str:
    """A plot's name for an evaluated model: by dataset ('dataset 1', 'base', 'prompt baseline', the control
    kind), with the `varying` settings of a trained run, its seed when it has one and its model when the suite
    trained several."""
    get = row.get if isinstance(row, (dict, pd.Series)) else lambda key, default=None: getattr(row, key, default)
    dataset = str(get("dataset"))
    seed = get("seed")
    model = get("model") if isinstance(row, (dict, pd.Series)) else getattr(row, "model_name", "")
    name = {"base": "base", PROMPT_BASELINE: "prompt baseline", CONTROL_QUALITY_FILE: "quality control",
            CONTROL_DATASET_FILES[0]: "degeneration control"}.get(Path(dataset).name, f"dataset {dataset}")
    setting = findings.describe_setting(SimpleNamespace(**{k: get(k) for k in varying}), varying)
    if setting and dataset not in ("base", PROMPT_BASELINE):
        name += f" · {setting}"
    if seed is not None and not pd.isna(seed) and dataset not in ("base", PROMPT_BASELINE):
        name += f" · seed {int(seed)}"
    return f"{name} · {str(model).split('/')[-1]}" if several_models else name


def _plots(entries: Sequence[ReportEntry], table: pd.DataFrame, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    several_models = table["model"].nunique() > 1
    varying = findings.varying_settings(entries)
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.8), squeeze=False)
    for axis, metric in zip(axes[0], PLOTTED):
        for _, row in table.iterrows():
            stats = [_stat(row, metric, b) for b in BUCKETS]
            xs = [i for i, s in enumerate(stats) if s]
            means = [stats[i]["mean"] for i in xs]
            errors = [[stats[i]["mean"] - stats[i]["ci_low"] for i in xs], [stats[i]["ci_high"] - stats[i]["mean"] for i in xs]]
            style = "--" if row["dataset"] == "base" else "-"
            axis.errorbar(xs, means, yerr=errors, linestyle=style, marker="o", capsize=3,
                          label=display_label(row, several_models, varying))
        axis.set_xticks(range(len(BUCKETS)), BUCKETS)
        axis.set_xlabel("prompt creativity")
        direction = "higher" if HIGHER_IS_MORE_DIVERSE.get(metric, True) else "lower"
        axis.set_title(f"{metric}\n({direction} = more diverse)", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "diversity_vs_creativity.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append("diversity_vs_creativity.png")

    trained = [e for e in entries if e.run_dir]
    if trained:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for entry in trained:
            metrics = read_jsonl(Path(entry.run_dir) / "metrics.jsonl")
            steps = [m["step"] for m in metrics]
            for axis, key in zip(axes, ("dpo_loss", "accuracy", "margin")):
                axis.plot(steps, [m[key] for m in metrics], marker=".", label=display_label(entry, several_models, varying))
                axis.set_title(key)
                axis.set_xlabel("step")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append("training_curves.png")

    return written


def report_artifact_markdown(report_md: Path) -> str:
    """report.md with its PNGs embedded (data URIs), so the Prefect UI shows the plots without file access."""
    import base64
    import re

    folder = report_md.parent

    def embed(match: re.Match) -> str:
        image = folder / match.group(2)
        if not image.exists():
            return match.group(0)
        encoded = base64.b64encode(image.read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{encoded})"

    return re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", embed, report_md.read_text())
