"""The study's stages as plain functions the Prefect tasks wrap: validate, train, evaluate, report, pairs.

Each takes typed records and `Settings` and returns a typed record or a path, so a notebook can run the same
steps without Prefect."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_core import data, dataset_checks
from dpo_core.checkpoints import final_record
from dpo_core.config import (ConfigError, EvalConfig, FrozenModel, TrainConfig, check_step_count, choose_run_dir,
                             model_slug)
from dpo_core.records import RunConfig, TrainOutcome
from dpo_core.settings import Settings

# The backend, training, sampling and report modules import tinker (hence torch), transformers, the cookbook or
# pandas: each function imports what it computes with, so a fully cached rerun loads none of them.
if TYPE_CHECKING:
    from dpo_core.report import ReportEntry


class ValidatedDataset(FrozenModel):
    path: str
    sha256: str
    rows: int
    report_markdown: str


def validate_dataset(dataset: int | str, settings: Settings) -> ValidatedDataset:
    """Strict validation at the door; raises DatasetError / DatasetNotFoundError with file, row, column.

    Token lengths are checked by training itself, with the run's renderer and max_length."""
    from dpo_core.public_datasets import conversion_note

    path = data.resolve_dataset(dataset, settings.data_dir, settings.cache_dir)
    _, report = dataset_checks.validate(path)
    note = conversion_note(path)  # a public set's source and the rows its converter dropped (ties, ...)
    return ValidatedDataset(path=str(path), sha256=data.content_hash(path), rows=report.rows,
                            report_markdown=report.to_markdown() + (f"\n\n{note}\n" if note else ""))


def served_models(settings: Settings) -> dict[str, bool]:
    """What the service serves (model name -> trainable there), asked before any training."""
    from dpo_core.backend import served_models as listed
    from dpo_core.backend import service_client

    with service_client(settings) as client:
        return listed(client)


def train_experiment(config: TrainConfig, settings: Settings, dataset: ValidatedDataset) -> TrainOutcome:
    """Train (or resume, or report finished) one experiment; returns where it is and its final checkpoint.

    The run folder is chosen once the service is known: a folder trained on another service (other weights
    under the same name, or checkpoints that live elsewhere) is another experiment."""
    from dpo_core.backend import check_model_supported, service_client
    from dpo_core.service import identify

    experiments_dir = Path(settings.experiments_dir)
    lock_dir = Path(settings.cache_dir) / "run-locks" / hashlib.sha256(
        str(experiments_dir.resolve()).encode()).hexdigest()[:16]
    with service_client(settings) as client:
        check_model_supported(client, config.model_name, settings.resolved_backend())
        service = identify(client, config.model_name, settings.resolved_backend())
        run_dir, lock = claim_run_dir(config, experiments_dir, lock_dir, dataset.sha256, service)
        try:
            return _train_in(run_dir, config, settings, dataset, client, service)
        finally:
            lock.close()  # releases the flock (the kernel also releases it if this process dies)


def claim_run_dir(config: TrainConfig, experiments_dir: Path, lock_dir: Path,
                  dataset_sha256: str | None = None, service: Any = None) -> tuple[Path, Any]:
    """Choose the run folder and hold an exclusive lock on it for the whole run.

    Two processes started at once with the same experiment would otherwise pick the same folder (it only
    appears once the reference logprobs are ready); the second one now moves on to `_2`.
    """
    import fcntl

    lock_dir.mkdir(parents=True, exist_ok=True)  # outside the experiments folder: nothing to see there
    taken: set[str] = set()
    while True:
        run_dir = choose_run_dir(config, experiments_dir, taken=taken, dataset_sha256=dataset_sha256,
                                 service=service)
        handle = open(lock_dir / f"{run_dir.name}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return run_dir, handle
        except BlockingIOError:
            handle.close()
            if config.log_path:
                raise ConfigError(f"log_path {run_dir} is being trained by another process right now") from None
            taken.add(run_dir.name)


def _train_in(run_dir: Path, config: TrainConfig, settings: Settings, dataset: ValidatedDataset, client: Any,
              service: Any) -> TrainOutcome:
    from dpo_core.logging_sinks import build_sinks
    from dpo_core.train import train

    pairs = data.load_pairs(Path(dataset.path))
    if data.content_hash(Path(dataset.path)) != dataset.sha256:
        raise ValueError(f"{dataset.path} changed after validation; rerun to validate it again")
    check_step_count(config, dataset.rows, Path(dataset.path).name)  # before any training
    with build_sinks(config, settings, run_dir) as sinks:
        return train(
            config, client, pairs, run_dir=run_dir, dataset_path=dataset.path, dataset_hash=dataset.sha256,
            reference_dir=Path(settings.cache_dir) / "reference", metrics_sinks=sinks, service=service,
        )


# ----------------------------------------------------------------------------------------------
# Evaluation and report
# ----------------------------------------------------------------------------------------------


def eval_prompts_path(config: EvalConfig, settings: Settings) -> Path:
    path = Path(config.eval_prompts)
    return path if path.is_absolute() or path.exists() else Path(settings.data_dir) / path


def eval_fingerprint(config: EvalConfig, settings: Settings, service: str | None = None) -> str:
    """Short hash of what decides an evaluation's numbers: the eval config, the eval prompts' bytes and, when
    given, the service identity (`ServiceIdentity.key()`) of the model sampled."""
    # The prompting baseline's instruction decides only that baseline's folder (its own suffix), not the others'.
    raw = json.dumps([config.model_dump(mode="json", exclude={"diversity_instruction"}),
                      data.content_hash(eval_prompts_path(config, settings)), *([service] if service else [])])
    return hashlib.sha256(raw.encode()).hexdigest()[:10]


_PREPARE_LOCK = threading.Lock()
_shared: dict[str, Any] = {}


def prepare_concurrent_evaluation() -> None:
    """Resolve transformers' and the cookbook's lazy imports once, one thread at a time (their lazy module
    loading is not thread-safe). Called by each evaluation rather than on import, so a fully cached rerun never
    imports them."""
    with _PREPARE_LOCK:
        if _shared.get("prepared"):
            return
        import transformers
        from tinker_cookbook import renderers, tokenizer_utils  # noqa: F401

        for name in ("AutoModel", "AutoTokenizer", "AutoModelForCausalLM", "PreTrainedTokenizerFast"):
            getattr(transformers, name)
        _shared["prepared"] = True


class _SerialEmbedder:
    """An embedder several threads share: one `encode` at a time (a fast tokenizer used from two threads at
    once raises "Already borrowed", and two encodes would only split the same CPUs)."""

    def __init__(self, embedder: Any):
        self._embedder, self._lock = embedder, threading.Lock()

    def encode(self, texts: Sequence[str]) -> Any:
        with self._lock:
            return self._embedder.encode(texts)


def shared_embedder() -> Any:
    """One sentence embedder per process: the concurrent evaluations of a suite share it, loaded once (each
    evaluation loaded its own before)."""
    from dpo_core import diversity

    with _PREPARE_LOCK:
        if "embedder" not in _shared:
            _shared["embedder"] = _SerialEmbedder(diversity.Embedder())
        return _shared["embedder"]


class EvalRequest(FrozenModel):
    """One model to evaluate: a base model (no model_path, no run_dir) or an experiment's final checkpoint."""

    label: str
    model_name: str
    model_path: str | None = None
    run_dir: str | None = None
    training_datasets: tuple[str, ...] = ()  # eval prompts found in these are an error
    renderer_name: str | None = None  # the renderer the model was trained with (config.json): one per run
    instruction: str | None = None  # the prompting baseline's instruction before every eval prompt


def plan_evaluation(run_dirs: Sequence[str], instruction: str | None = None) -> list[EvalRequest]:
    """Each base model once (checked against every dataset trained on it), with `instruction` also the base
    model prompted with it (the prompting baseline), then each experiment's final checkpoint (checked against
    its own dataset)."""
    runs = [(str(run_dir), RunConfig.read(run_dir), final_record(run_dir)) for run_dir in run_dirs]
    trained_on: dict[str, list[str]] = {}
    for _, run, _ in runs:
        datasets = trained_on.setdefault(run.train_config.model_name, [])
        if run.dataset_path not in datasets:
            datasets.append(run.dataset_path)
    # A base model is prompted as its experiments were trained (the first run's renderer, when they differ).
    rendered_as: dict[str, str] = {}
    for _, run, _ in runs:
        rendered_as.setdefault(run.train_config.model_name, run.renderer_name)
    requests = [EvalRequest(label=f"{model} (base)", model_name=model, training_datasets=tuple(datasets),
                            renderer_name=rendered_as[model])
                for model, datasets in trained_on.items()]
    if instruction:
        requests += [EvalRequest(label=f"{model} (base + diversity prompt)", model_name=model,
                                 training_datasets=tuple(datasets), renderer_name=rendered_as[model],
                                 instruction=instruction)
                     for model, datasets in trained_on.items()]
    requests += [EvalRequest(label=Path(run_dir).name, model_name=run.train_config.model_name,
                             model_path=final.sampler_path, run_dir=run_dir, training_datasets=(run.dataset_path,),
                             renderer_name=run.renderer_name)
                 for run_dir, run, final in runs]
    return requests


def report_entries(requests: Sequence[EvalRequest], eval_dirs: Sequence[str]) -> list[ReportEntry]:
    """The report's rows: each evaluated model with its eval folder (and its hyperparameters, if trained)."""
    from dpo_core.report import ReportEntry

    entries = []
    for request, eval_dir in zip(requests, eval_dirs):
        row = {"label": request.label, "model_name": request.model_name, "eval_dir": eval_dir}
        if request.instruction:
            row["dataset"] = data.PROMPT_BASELINE
        if request.run_dir:
            config = RunConfig.read(request.run_dir).train_config
            row |= {"dataset": str(config.dataset), "learning_rate": config.learning_rate,
                    "dpo_beta": config.dpo_beta, "loss_type": config.loss_type, "run_dir": request.run_dir,
                    "seed": config.seed}
        entries.append(ReportEntry(**row))
    return entries


def evaluate_model(request: EvalRequest, eval_config: EvalConfig, settings: Settings) -> str:
    """Sample and score one model on the eval prompts; returns its eval folder (samples, scores, summary).

    A base model's evaluation lives in `experiments/base_models/<model>/eval_<fingerprint>/`, a trained
    model's in `<run_dir>/eval/final_<fingerprint>/`; the fingerprint includes the service identity, so two
    servers' weights under one name never share a folder.
    """
    from dpo_core import evaluate
    from dpo_core.backend import service_client
    from dpo_core.service import identify

    prepare_concurrent_evaluation()
    prompts_file = eval_prompts_path(eval_config, settings)
    prompts = evaluate.select_prompts(data.load_eval_prompts(prompts_file), eval_config)
    for dataset_path in request.training_datasets:
        training = {p.prompt_text() for p in data.load_pairs(Path(dataset_path))}
        evaluate.check_no_overlap(prompts, training, dataset_path)
    embedder = shared_embedder()
    with service_client(settings) as client:
        service = identify(client, request.model_name, settings.resolved_backend())
        out_dir = _eval_dir(request, settings, eval_fingerprint(eval_config, settings, service.key()))
        target = evaluate.EvalTarget(request.label, request.model_name, request.model_path, request.renderer_name,
                                     request.instruction)
        # Two suites evaluating one base model would otherwise both sample it, and the later one would swap the
        # folder out while the earlier one's report reads it: one evaluates, the other waits and reuses it.
        with _evaluation_lock(out_dir, settings):
            if evaluate.finished_evaluation(out_dir, target, eval_config) is None:
                evaluate.sample_and_score(client, target, prompts, eval_config, embedder, out_dir)
            else:
                print(f"{request.label}: reusing the evaluation in {out_dir} (same model, weights, prompts, "
                      "settings and code)", flush=True)
    return str(out_dir)


@contextlib.contextmanager
def _evaluation_lock(out_dir: Path, settings: Settings) -> Iterator[None]:
    """An exclusive lock on one evaluation folder (kept under the cache folder, outside the experiments)."""
    import fcntl

    lock_dir = Path(settings.cache_dir) / "eval-locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:24]
    with open(lock_dir / f"{name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process evaluating into {out_dir}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock (the kernel releases it too if this process dies)


def _eval_dir(request: EvalRequest, settings: Settings, fingerprint: str) -> Path:
    if request.run_dir:
        return Path(request.run_dir) / "eval" / f"final_{fingerprint}"
    # A base model prompted through another renderer than its default samples other text: another folder.
    from dpo_core.rendering import renderer_name_for

    rendered = request.renderer_name
    suffix = "" if rendered in (None, renderer_name_for(request.model_name)) else "_" + re.sub(
        r"[^A-Za-z0-9_-]", "-", rendered)
    if request.instruction:  # the prompting baseline: the same model and weights, other prompts
        suffix += "_prompted-" + hashlib.sha256(request.instruction.encode()).hexdigest()[:8]
    return (Path(settings.experiments_dir) / "base_models" / model_slug(request.model_name)
            / f"eval_{fingerprint}{suffix}")


def write_report(entries: Sequence[ReportEntry], out_dir: str, notes: Sequence[str] | None = None) -> str:
    """The comparison report over evaluated models (see dpo_core.report), `notes` under its title; returns
    report.md's path."""
    from dpo_core.report import write_report as write

    return str(write(entries, Path(out_dir), notes=notes))


def build_pairs(config: Any, settings: Settings) -> dict[str, Any]:
    """Sample candidate pools and write the three datasets (see dpo_core.pairs); returns the summary."""
    from dpo_core import pairs
    from dpo_core.backend import check_model_supported, service_client

    with service_client(settings) as client:
        check_model_supported(client, config.model_name, settings.resolved_backend())
        return pairs.build_pairs(client, config, Path(settings.cache_dir), settings.resolved_backend())
