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

