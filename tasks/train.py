"""Tasks: train one DPO experiment; register its final checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from dpo_core import checkpoints, data, experiment
from dpo_core.config import TrainConfig
from dpo_core.records import CheckpointRecord, TrainOutcome
from dpo_core.settings import Settings
from tasks.caching import content_key
from tasks.policy import CACHED, NETWORK_RETRIES, where
from tasks.setup import task_tags


# A retry resumes from the run's checkpoints.jsonl: no step is lost or repeated.
@task(name="train-dpo", tags=task_tags("tinker-train"), **NETWORK_RETRIES, timeout_seconds=24 * 3600,
      cache_key_fn=content_key(extra=where), **CACHED)
def train_experiment(config: TrainConfig, dataset: experiment.ValidatedDataset) -> TrainOutcome:
    return experiment.train_experiment(config, Settings(), dataset)


def _registry(parameters: dict[str, Any]) -> str | None:
    registry = Path(parameters["run_dir"]) / "checkpoints.jsonl"
    return data.content_hash(registry) if registry.exists() else None


@task(name="register-checkpoint", tags=task_tags(), cache_key_fn=content_key(extra=_registry), **CACHED)
def register_checkpoint(run_dir: str) -> CheckpointRecord:
    return checkpoints.final_record(run_dir)

