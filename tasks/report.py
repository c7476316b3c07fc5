"""Task: the comparison report over evaluated models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from dpo_core import data, experiment
from dpo_core.report import ReportEntry
from tasks.caching import content_key
from tasks.policy import CACHED
from tasks.setup import task_tags


def _report_inputs(parameters: dict[str, Any]) -> list[str]:
    hashes = []
    for entry in parameters["entries"]:
        for file in (Path(entry.eval_dir) / "summary.json",
                     Path(entry.run_dir) / "metrics.jsonl" if entry.run_dir else None):
            if file is not None and file.exists():
                hashes.append(data.content_hash(file))
    return hashes


@task(name="report-entries", tags=task_tags())
def report_entries(requests: list[experiment.EvalRequest], eval_dirs: list[str]) -> list[ReportEntry]:
    return experiment.report_entries(requests, eval_dirs)


@task(name="write-report", tags=task_tags(), cache_key_fn=content_key(extra=_report_inputs), **CACHED)
def write_report(entries: list[ReportEntry], out_dir: str) -> str:
    return experiment.write_report(entries, out_dir)


@task(name="publish-report", tags=task_tags())
def publish_report(report_path: str) -> None:
    """The report as a Prefect artifact, plots embedded, so the UI shows it without file access."""
    from prefect.artifacts import create_markdown_artifact

    from dpo_core.report import report_artifact_markdown

    create_markdown_artifact(key="dpo-diversity-report", markdown=report_artifact_markdown(Path(report_path)),
                             description="Output diversity: datasets x models vs base, by creativity")
