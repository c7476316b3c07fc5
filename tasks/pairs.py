"""Task: build the three preference datasets from candidate pools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from dpo_core import data, experiment
from dpo_core.pairs import PairsConfig
from dpo_core.settings import Settings
from tasks.caching import content_key
from tasks.policy import CACHED, NETWORK_RETRIES, where
from tasks.setup import task_tags


def _prompts_file(parameters: dict[str, Any]) -> list[Any]:
    config = parameters["config"]
    path = Path(config.prompts)
    return [*where(), data.content_hash(path) if path.exists() else None, str(Path(config.out_dir).resolve())]


# Per-prompt stages are cached on disk inside dpo_core.pairs (adding prompts samples only the new ones); this
# key makes an unchanged rerun a Prefect cache hit as a whole.
@task(name="build-pairs", tags=task_tags("tinker-sample"), **NETWORK_RETRIES,
      cache_key_fn=content_key(extra=_prompts_file), **CACHED)
def build_pairs(config: PairsConfig) -> dict[str, Any]:
    return experiment.build_pairs(config, Settings())


@task(name="publish-pairs", tags=task_tags())
def publish_pairs(summary: dict[str, Any], out_dir: str) -> None:
    """Yield per criterion (a table artifact) and the gap plot (a markdown artifact), also printed."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from dpo_core.report import report_artifact_markdown

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
