"""Task: strict validation of one dataset (the hard gate before any Tinker call)."""

from __future__ import annotations

from typing import Any

from prefect import task

from dpo_core import data, experiment
from dpo_core.settings import Settings
from tasks.caching import content_key
from tasks.policy import CACHED
from tasks.setup import task_tags


def _dataset_file(parameters: dict[str, Any]) -> list[str] | None:
    """The resolved file and its bytes: the result names the path, so both are part of the key."""
    try:
        settings = Settings()
        path = data.resolve_dataset(parameters["dataset"], settings.data_dir, settings.cache_dir)
        return [str(path.resolve()), data.content_hash(path)]
    except (FileNotFoundError, ValueError):
        return None  # the task itself raises the clear error


@task(name="validate-dataset", tags=task_tags("validate"), cache_key_fn=content_key(extra=_dataset_file), **CACHED)
def validate_dataset(dataset: int | str) -> experiment.ValidatedDataset:
    return experiment.validate_dataset(dataset, Settings())
