"""The comparison report: datasets x models x hyperparameters against the base models, by creativity bucket.

Writes `report.md`, `table.csv` (every number in the report, one row per evaluated model) and PNG plots into
one folder. All numbers come from the evaluations' `summary.json`, which are computed from their
`scores.parquet` (per prompt), so the report can be checked against the per-prompt files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dpo_core.checkpoints import read_jsonl
from dpo_core.config import EvalConfig, FrozenModel
from dpo_core.data import DATASET_CRITERIA
from dpo_core.diversity import HIGHER_IS_MORE_DIVERSE
from dpo_core.fsutil import atomic_folder
from dpo_core.evaluate import BUCKETS

DIVERSITY = ("embedding_distance", "vendi", "distinct_1", "distinct_2", "self_bleu", "compression_ratio")
PLOTTED = ("embedding_distance", "vendi", "distinct_2", "self_bleu")


class ReportEntry(FrozenModel):
    """One evaluated model: a base model (run_dir None) or an experiment's final checkpoint."""

    label: str
    model_name: str
    eval_dir: str
    dataset: str | None = None
    learning_rate: float | None = None
    dpo_beta: float | None = None
    run_dir: str | None = None


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
                               "learning_rate": entry.learning_rate, "dpo_beta": entry.dpo_beta}
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


def write_report(entries: Sequence[ReportEntry], out_dir: Path, title: str = "dpo-suite: output diversity",
                 notes: Sequence[str] | None = None) -> Path:
    """Write the report folder (atomically: built in a temp folder, then renamed). Returns report.md's path.
    `notes` (e.g. the suite's model replacements) are listed under the title."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        table = build_table(entries)
        table.to_csv(tmp / "table.csv", index=False)
        plots = _plots(entries, table, tmp)
        (tmp / "report.md").write_text(_with_notes(_markdown(entries, table, plots, title), notes))
    return out_dir / "report.md"


# --- plan notes (added for issue 13's lineup-aware planning; kept apart from the findings) ---
def _with_notes(markdown: str, notes: Sequence[str] | None) -> str:
    """The suite's plan notes (replaced or skipped models) as a list right under the report's title line."""
    if not notes:
        return markdown
    title, _, rest = markdown.partition("\n")
    block = "\n".join(["", "**Plan notes**", "", *(f"- {note}" for note in notes)])
    return f"{title}\n{block}\n{rest}"


def _markdown(entries: Sequence[ReportEntry], table: pd.DataFrame, plots: list[str], title: str) -> str:
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
        "", "Datasets: " + "; ".join(f"{n} = {c}" for n, c in DATASET_CRITERIA.items()) + ".", "",
        "## Overall", "",
    ]
    header = ["model", "dataset", "lr", "β", *DIVERSITY, "quality_logprob", "mean_tokens", "DPO acc", "DPO margin"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for _, row in table.iterrows():
        cells = [row["model"], str(row["dataset"]), _num(row["learning_rate"], "g"), _num(row["dpo_beta"], "g")]
        cells += [_fmt(_stat(row, m, "all")) for m in DIVERSITY]
        cells += [_fmt(_stat(row, "quality_logprob", "all")), _fmt(_stat(row, "mean_tokens", "all"), 1),
                  _num(row["dpo/accuracy"], ".2f"), _num(row["dpo/margin"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    for metric in DIVERSITY:
        lines += ["", f"## {metric} by creativity bucket", "",
                  "| model | dataset | lr | β | " + " | ".join(BUCKETS) + " |", "|---|---|---|---|" + "---|" * len(BUCKETS)]
        for _, row in table.iterrows():
            cells = [row["model"], str(row["dataset"]), _num(row["learning_rate"], "g"), _num(row["dpo_beta"], "g")]
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


def _plots(entries: Sequence[ReportEntry], table: pd.DataFrame, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.8), squeeze=False)
    for axis, metric in zip(axes[0], PLOTTED):
        for _, row in table.iterrows():
            stats = [_stat(row, metric, b) for b in BUCKETS]
            xs = [i for i, s in enumerate(stats) if s]
            means = [stats[i]["mean"] for i in xs]
            errors = [[stats[i]["mean"] - stats[i]["ci_low"] for i in xs], [stats[i]["ci_high"] - stats[i]["mean"] for i in xs]]
            style = "--" if row["dataset"] == "base" else "-"
            axis.errorbar(xs, means, yerr=errors, linestyle=style, marker="o", capsize=3, label=row["label"])
        axis.set_xticks(range(len(BUCKETS)), BUCKETS)
        axis.set_xlabel("prompt creativity")
        direction = "higher" if HIGHER_IS_MORE_DIVERSE[metric] else "lower"
        axis.set_title(f"{metric} ({direction} = more diverse)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "diversity_vs_creativity.png", dpi=110)
    plt.close(fig)
    written.append("diversity_vs_creativity.png")

    trained = [e for e in entries if e.run_dir]
    if trained:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for entry in trained:
            metrics = read_jsonl(Path(entry.run_dir) / "metrics.jsonl")
            steps = [m["step"] for m in metrics]
            for axis, key in zip(axes, ("dpo_loss", "accuracy", "margin")):
                axis.plot(steps, [m[key] for m in metrics], marker=".", label=entry.label)
                axis.set_title(key)
                axis.set_xlabel("step")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=110)
        plt.close(fig)
        written.append("training_curves.png")

    models = list(dict.fromkeys(table["model"]))
    if len(models) > 1:
        datasets = list(dict.fromkeys(table["dataset"]))
        fig, axis = plt.subplots(figsize=(1.6 + 1.4 * len(models) * max(len(datasets), 1) / 2, 3.8))
        width = 0.8 / max(len(datasets), 1)
        for d, dataset in enumerate(datasets):
            values = []
            for model in models:
                match = table[(table["model"] == model) & (table["dataset"] == dataset)]
                values.append(match["embedding_distance/all"].mean() if len(match) else float("nan"))
            axis.bar([m + d * width for m in range(len(models))], values, width=width, label=str(dataset))
        axis.set_xticks([m + width * (len(datasets) - 1) / 2 for m in range(len(models))], models, fontsize=7)
        axis.set_ylabel("embedding_distance (all prompts)")
        axis.set_title("model size: diversity by dataset")
        axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "model_size.png", dpi=110)
        plt.close(fig)
        written.append("model_size.png")
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
