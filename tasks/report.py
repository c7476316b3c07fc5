"""Task: the comparison report over evaluated models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from dpo_core import data, experiment, logging_sinks
from dpo_core.settings import Settings
from tasks.caching import content_key
from tasks.policy import CACHED
from tasks.setup import task_tags


def _report_inputs(parameters: dict[str, Any]) -> list[str]:
    """The bytes the report is made of: each evaluation's summary, per-prompt scores and samples (the paired
    findings), and each experiment's metrics, held-out metrics and config."""
    files = [Path(eval_dir) / name for eval_dir in parameters["eval_dirs"]
             for name in ("summary.json", "scores.parquet", "samples.jsonl")]
    for request in parameters["requests"]:
        if request.run_dir:
            files += [Path(request.run_dir) / name for name in ("metrics.jsonl", "held_out.jsonl", "config.json")]
    return [data.content_hash(file) for file in files if file.exists()]


@task(name="write-report", tags=task_tags(), cache_key_fn=content_key(extra=_report_inputs), **CACHED)
def write_report(requests: list[experiment.EvalRequest], eval_dirs: list[str], out_dir: str,
                 notes: list[str] | None = None) -> str:
    report_md = experiment.write_report(experiment.report_entries(requests, eval_dirs), out_dir, notes)
    # The findings table and plots to W&B too, when the experiments (or DPO_WANDB_PROJECT) name a project.
    logging_sinks.log_report(report_md, [r.run_dir for r in requests if r.run_dir], Settings())
    return report_md
