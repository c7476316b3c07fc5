"""Prefect tasks around dpo_core.experiment: retries, timeouts and tags only.

Tasks build `Settings()` from the worker's environment themselves, so no secret ever becomes a task input.
"""

from __future__ import annotations

from typing import Any

import httpx
import tinker
from prefect import task
from prefect.cache_policies import NO_CACHE

from dpo_core import checkpoints, experiment
from dpo_core.config import TrainConfig
from dpo_core.settings import Settings

TRANSIENT = (tinker.APIConnectionError, tinker.APITimeoutError, tinker.InternalServerError,
             tinker.RateLimitError, httpx.TransportError)


def _transient(task, task_run, state) -> bool:
    """Retry only network-level failures; a user error (bad data, unknown model) fails at once."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception:
        return False
    return False


@task(name="validate-dataset", tags=["dpo", "validate"], cache_policy=NO_CACHE)
def validate_dataset(dataset: int | str) -> experiment.ValidatedDataset:
    return experiment.validate_dataset(dataset, Settings())


@task(name="train-dpo", tags=["dpo", "tinker-train"], cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=[10, 60], retry_condition_fn=_transient, timeout_seconds=24 * 3600)
def train_experiment(config: TrainConfig, dataset: experiment.ValidatedDataset) -> dict[str, Any]:
    # A retry resumes from the run's checkpoints.jsonl: no step is lost or repeated.
    return experiment.train_experiment(config, Settings(), dataset)


@task(name="register-checkpoint", tags=["dpo"], cache_policy=NO_CACHE)
def register_checkpoint(run_dir: str) -> dict[str, Any]:
    return checkpoints.final_record(run_dir)
