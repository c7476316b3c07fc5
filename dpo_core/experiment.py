"""One DPO experiment end to end, as plain functions the Prefect tasks wrap: validate, train, register."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_core import data
from dpo_core.backend import check_model_supported, service_client
from dpo_core.config import TrainConfig, choose_run_dir, run_name
from dpo_core.logging_sinks import build_sinks
from dpo_core.settings import Settings
from dpo_core.train import TrainResult, train


@dataclass(frozen=True)
class ValidatedDataset:
    path: str
    sha256: str
    rows: int
    report_markdown: str


def validate_dataset(dataset: int | str, settings: Settings, max_length: int | None = None) -> ValidatedDataset:
    """Strict validation at the door; raises DatasetError / DatasetNotFoundError with file, row, column."""
    path = data.resolve_dataset(dataset, settings.data_dir)
    _, report = data.validate(path, max_length=None)
    return ValidatedDataset(str(path), data.content_hash(path), report.rows, report.to_markdown())


def train_experiment(config: TrainConfig, settings: Settings, dataset: ValidatedDataset) -> dict[str, Any]:
    """Train (or resume, or report finished) one experiment; returns JSON-friendly facts about the run."""
    run_dir = choose_run_dir(config, Path(settings.experiments_dir))
    pairs = data.load_pairs(Path(dataset.path))
    if data.content_hash(Path(dataset.path)) != dataset.sha256:
        raise ValueError(f"{dataset.path} changed after validation; rerun to validate it again")
    wandb_name = config.wandb_name or (run_dir.name if config.wandb_project else None)
    with service_client(settings) as client:
        check_model_supported(client, config.model_name, settings.resolved_backend())
        with build_sinks(config, settings, wandb_name, run_dir) as sinks:
            result: TrainResult = train(
                config, client, pairs, run_dir=run_dir, dataset_path=dataset.path, dataset_hash=dataset.sha256,
                reference_dir=Path(settings.cache_dir) / "reference", metrics_sinks=sinks,
            )
    return {"run_dir": str(result.run_dir), "steps": result.steps, "sampler_path": result.final_sampler_path,
            "state_path": result.final_state_path, "already_finished": result.already_finished,
            "name": run_dir.name, "default_name": run_name(config)}
