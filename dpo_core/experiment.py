"""One DPO experiment end to end, as plain functions the Prefect tasks wrap: validate, train, register."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dpo_core import data
from dpo_core.backend import check_model_supported, service_client
from dpo_core.config import ConfigError, EvalConfig, FrozenModel, TrainConfig, choose_run_dir, model_slug, run_name
from dpo_core.logging_sinks import build_sinks
from dpo_core.settings import Settings
from dpo_core.train import TrainResult, train


class ValidatedDataset(FrozenModel):
    path: str
    sha256: str
    rows: int
    report_markdown: str


def validate_dataset(dataset: int | str, settings: Settings, max_length: int | None = None) -> ValidatedDataset:
    """Strict validation at the door; raises DatasetError / DatasetNotFoundError with file, row, column."""
    path = data.resolve_dataset(dataset, settings.data_dir)
    _, report = data.validate(path, max_length=None)
    return ValidatedDataset(path=str(path), sha256=data.content_hash(path), rows=report.rows,
                            report_markdown=report.to_markdown())


def train_experiment(config: TrainConfig, settings: Settings, dataset: ValidatedDataset) -> dict[str, Any]:
    """Train (or resume, or report finished) one experiment; returns JSON-friendly facts about the run."""
    experiments_dir = Path(settings.experiments_dir)
    lock_dir = Path(settings.cache_dir) / "run-locks" / hashlib.sha256(
        str(experiments_dir.resolve()).encode()).hexdigest()[:16]
    run_dir, lock = claim_run_dir(config, experiments_dir, lock_dir)
    try:
        return _train_in(run_dir, config, settings, dataset)
    finally:
        lock.close()  # releases the flock (the kernel also releases it if this process dies)


def claim_run_dir(config: TrainConfig, experiments_dir: Path, lock_dir: Path) -> tuple[Path, Any]:
    """Choose the run folder and hold an exclusive lock on it for the whole run.

    Two processes started at once with the same experiment would otherwise pick the same folder (it only
    appears once the reference logprobs are ready); the second one now moves on to `_2`.
    """
    import fcntl

    lock_dir.mkdir(parents=True, exist_ok=True)  # outside the experiments folder: nothing to see there
    taken: set[str] = set()
    while True:
        run_dir = choose_run_dir(config, experiments_dir, taken=taken)
        handle = open(lock_dir / f"{run_dir.name}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return run_dir, handle
        except BlockingIOError:
            handle.close()
            if config.log_path:
                raise ConfigError(f"log_path {run_dir} is being trained by another process right now") from None
            taken.add(run_dir.name)


def _train_in(run_dir: Path, config: TrainConfig, settings: Settings, dataset: ValidatedDataset) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------------
# Evaluation and report
# ----------------------------------------------------------------------------------------------


def eval_prompts_path(config: EvalConfig, settings: Settings) -> Path:
    path = Path(config.eval_prompts)
    return path if path.is_absolute() or path.exists() else Path(settings.data_dir) / path


def eval_fingerprint(config: EvalConfig, settings: Settings) -> str:
    """Short hash of what decides an evaluation's numbers: the eval config and the eval prompts' bytes."""
    raw = json.dumps([config.model_dump(mode="json"), data.content_hash(eval_prompts_path(config, settings))])
    return hashlib.sha256(raw.encode()).hexdigest()[:10]


def prepare_concurrent_evaluation() -> None:
    """Resolve transformers' and the cookbook's lazy imports in this thread before evaluations run in several
    (their lazy module loading is not thread-safe)."""
    import transformers
    from tinker_cookbook import renderers, tokenizer_utils  # noqa: F401

    for name in ("AutoModel", "AutoTokenizer", "AutoModelForCausalLM", "PreTrainedTokenizerFast"):
        getattr(transformers, name)


def evaluate_model(label: str, model_name: str, model_path: str | None, eval_config: EvalConfig, settings: Settings,
                   run_dir: str | None = None, training_datasets: tuple[str, ...] = ()) -> str:
    """Sample and score one model on the eval prompts; returns its eval folder (samples, scores, summary).

    A base model's evaluation lives in `experiments/base_models/<model>/eval_<fingerprint>/`, a trained
    model's in `<run_dir>/eval/final_<fingerprint>/`.
    """
    from dpo_core import diversity, evaluate

    prompts_file = eval_prompts_path(eval_config, settings)
    prompts = evaluate.select_prompts(data.load_eval_prompts(prompts_file), eval_config)
    for dataset_path in training_datasets:
        training = {p.prompt_text() for p in data.load_pairs(Path(dataset_path))}
        evaluate.check_no_overlap(prompts, training, dataset_path)
    fingerprint = eval_fingerprint(eval_config, settings)
    if run_dir:
        out_dir = Path(run_dir) / "eval" / f"final_{fingerprint}"
    else:
        out_dir = Path(settings.experiments_dir) / "base_models" / model_slug(model_name) / f"eval_{fingerprint}"
    embedder = diversity.Embedder()
    with service_client(settings) as client:
        evaluate.sample_and_score(client, evaluate.EvalTarget(label, model_name, model_path), prompts, eval_config,
                                  embedder, out_dir)
    return str(out_dir)


def write_report(entries: list[dict[str, Any]], out_dir: str) -> str:
    """The comparison report over evaluated models (see dpo_core.report); returns report.md's path."""
    from dpo_core.report import ReportEntry
    from dpo_core.report import write_report as write

    return str(write([ReportEntry(**entry) for entry in entries], Path(out_dir)))


def build_pairs(config: Any, settings: Settings) -> dict[str, Any]:
    """Sample candidate pools and write the three datasets (see dpo_core.pairs); returns the summary."""
    from dpo_core import pairs

    with service_client(settings) as client:
        check_model_supported(client, config.model_name, settings.resolved_backend())
        return pairs.build_pairs(client, config, Path(settings.cache_dir))
