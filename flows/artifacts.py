"""What the flows show in the Prefect UI. Artifacts are made here, in the flow, rather than in tasks: a cached
task does not run, so an artifact made inside it would be missing from every cached rerun's page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dpo_core.records import TrainOutcome
from dpo_core.report import report_artifact_markdown


def publish_validation(dataset: int | str, report_markdown: str) -> None:
    slug = "".join(c if c.isalnum() else "-" for c in str(dataset).lower())[-40:].strip("-") or "dataset"
    create_markdown_artifact(key=f"validation-{slug}", markdown=report_markdown,
                             description=f"Validation report of dataset {dataset}")


def publish_checkpoints(outcomes: list[TrainOutcome]) -> None:
    """Where the weights are: the final checkpoints' tinker:// paths."""
    create_table_artifact(key="dpo-checkpoints", description="Final checkpoints (tinker:// paths)", table=[
        {"experiment": Path(o.run_dir).name, "steps": o.steps, "sampler_path": o.final.sampler_path,
         "state_path": o.final.state_path} for o in outcomes])


def publish_report(report_path: str) -> None:
    """The report with its plots embedded, so the UI shows them without file access."""
    create_markdown_artifact(key="dpo-diversity-report", markdown=report_artifact_markdown(Path(report_path)),
                             description="Output diversity: datasets x models vs base, by creativity")


def publish_pairs(summary: dict[str, Any], out_dir: str) -> None:
    """Yield per criterion (a table) and the gap plot; the same lines printed to the log."""
    rows = [{"dataset": n, **v} for n, v in summary["per_dataset"].items()]
    create_table_artifact(key="dpo-pairs-yield", table=rows, description="Pairs per criterion, drops, mean gaps")
    plot = Path(out_dir) / "pairs_gaps.png"
    if plot.exists():
        note = plot.with_suffix(".md")
        note.write_text(f"# dpo-pairs\n\n![gaps]({plot.name})\n")
        create_markdown_artifact(key="dpo-pairs-gaps", markdown=report_artifact_markdown(note))
        note.unlink()
    for row in rows:
        print(f"dataset {row['dataset']} ({row['criterion']}): {row['pairs']} pairs, "
              f"{row['dropped_too_close']} dropped as too close, {row['no_pair']} prompts without a pair")
    print(f"judge parse failures: {summary['judge_failures']}; files: {summary['files']}")
