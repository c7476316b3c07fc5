"""Prefect tasks around dpo_core.experiment: retries, cache keys, timeouts and tags only.

Tasks build `Settings()` from the worker's environment themselves, so no secret ever becomes a task input.
Results are JSON (never pickle) and cached on content: see tasks/caching.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import tinker
from prefect import task

from dpo_core import checkpoints, data, diversity, evaluate, experiment, loss, pairs, report, train
from dpo_core.config import EvalConfig, TrainConfig
from dpo_core.pairs import PairsConfig
from dpo_core.settings import Settings
from tasks.caching import keyed_on
from tasks.setup import task_tags

TRANSIENT = (tinker.APIConnectionError, tinker.APITimeoutError, tinker.InternalServerError,
             tinker.RateLimitError, httpx.TransportError)
CACHED = {"persist_result": True, "result_serializer": "json"}


def _transient(task, task_run, state) -> bool:
    """Retry only network-level failures; a user error (bad data, unknown model) fails at once."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception:
        return False
    return False


def _dataset_file(parameters: dict[str, Any]) -> list[str] | None:
    """The resolved file and its bytes: the result names the path, so both are part of the key."""
    try:
        path = data.resolve_dataset(parameters["dataset"], Settings().data_dir)
        return [str(path.resolve()), data.content_hash(path)]
    except (FileNotFoundError, ValueError):
        return None  # the task itself raises the clear error


def _where(settings: Settings) -> list[str]:
    """The backend and the folders results land in: the same config elsewhere is another experiment."""
    return [settings.resolved_backend(), str(Path(settings.experiments_dir).resolve()),
            str(Path(settings.local_storage).resolve())]


def _backend(parameters: dict[str, Any]) -> list[str]:
    return _where(Settings())


def _eval_inputs(parameters: dict[str, Any]) -> list[Any]:
    settings = Settings()
    return [*_where(settings), experiment.eval_fingerprint(parameters["eval_config"], settings)]


def _report_inputs(parameters: dict[str, Any]) -> list[str]:
    hashes = []
    for entry in parameters["entries"]:
        for file in (Path(entry["eval_dir"]) / "summary.json",
                     Path(entry["run_dir"]) / "metrics.jsonl" if entry.get("run_dir") else None):
            if file is not None and file.exists():
                hashes.append(data.content_hash(file))
    return hashes


@task(name="validate-dataset", tags=task_tags("validate"), cache_key_fn=keyed_on(data, extra=_dataset_file), **CACHED)
def validate_dataset(dataset: int | str) -> experiment.ValidatedDataset:
    return experiment.validate_dataset(dataset, Settings())


@task(name="train-dpo", tags=task_tags("tinker-train"), retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=_transient, timeout_seconds=24 * 3600,
      cache_key_fn=keyed_on(train, loss, extra=_backend), **CACHED)
def train_experiment(config: TrainConfig, dataset: experiment.ValidatedDataset) -> dict[str, Any]:
    # A retry resumes from the run's checkpoints.jsonl: no step is lost or repeated.
    return experiment.train_experiment(config, Settings(), dataset)


def _registry(parameters: dict[str, Any]) -> str | None:
    registry = Path(parameters["run_dir"]) / "checkpoints.jsonl"
    return data.content_hash(registry) if registry.exists() else None


@task(name="register-checkpoint", tags=task_tags(), cache_key_fn=keyed_on(checkpoints, extra=_registry), **CACHED)
def register_checkpoint(run_dir: str) -> dict[str, Any]:
    return checkpoints.final_record(run_dir)


# No task timeout here: evaluations run in worker threads, where Prefect cannot interrupt them; the SDK's own
# per-request timeouts and retries bound a stuck sampling call instead.
@task(name="evaluate-diversity", tags=task_tags("tinker-sample"), retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=_transient,
      cache_key_fn=keyed_on(evaluate, diversity, files=("training_datasets",), extra=_eval_inputs), **CACHED)
def evaluate_model(label: str, model_name: str, model_path: str | None, eval_config: EvalConfig,
                   run_dir: str | None = None, training_datasets: tuple[str, ...] = ()) -> str:
    return experiment.evaluate_model(label, model_name, model_path, eval_config, Settings(), run_dir,
                                     tuple(training_datasets))


@task(name="write-report", tags=task_tags(), cache_key_fn=keyed_on(report, extra=_report_inputs), **CACHED)
def write_report(entries: list[dict[str, Any]], out_dir: str) -> str:
    return experiment.write_report(entries, out_dir)


def _prompts_file(parameters: dict[str, Any]) -> list[Any]:
    config = parameters["config"]
    path = Path(config.prompts)
    return [*_where(Settings()), data.content_hash(path) if path.exists() else None,
            str(Path(config.out_dir).resolve())]


# Per-prompt stages are cached on disk inside dpo_core.pairs (adding prompts samples only the new ones); this
# key makes an unchanged rerun a Prefect cache hit as a whole.
@task(name="build-pairs", tags=task_tags("tinker-sample"), retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=_transient, cache_key_fn=keyed_on(pairs, extra=_prompts_file), **CACHED)
def build_pairs(config: PairsConfig) -> dict[str, Any]:
    return experiment.build_pairs(config, Settings())
