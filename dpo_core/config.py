"""Run configuration (frozen pydantic models) and experiment naming, as in the seed guide."""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from dpo_core.service import ServiceIdentity

SEED_MODELS = (
    "Qwen/Qwen3-4B-Instruct-2507",
    "Qwen/Qwen3-8B",
    "Qwen/Qwen3-30B-A3B-Instruct-2507",
)
LOCAL_DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The prompting baseline's instruction: the base model asked for variety, evaluated like a trained model.
PROMPT_BASELINE_INSTRUCTION = ("Give an original answer that differs from the most common one; surprise the "
                               "reader while staying on topic.")


class ConfigError(ValueError):
    """A bad key or value in a run configuration; the message is meant for the user as is."""


class FrozenModel(BaseModel):
    # Strict and frozen: unknown keys are user errors, caught at the door. A field's docstring is its description:
    # `--help` and docs/configuration.md print it (dpo_core/config_docs.py).
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)


class TrainConfig(FrozenModel):
    """One DPO experiment: the seed guide's parameters and defaults, plus a few knobs."""

    # --- essential ---
    model_name: str
    """Base model to fine-tune: a Tinker model name (Qwen/Qwen3-8B), or on the local backend local/tiny,
    HuggingFaceTB/SmolLM2-135M-Instruct or a DPO_LOCAL_MODELS name.
    """
    dataset: int | str
    """Preference data: 1, 2 or 3 (the data folder's embedding-diversity, quality and LLM-judge-diversity
    datasets), or a path to a parquet/jsonl file or HF datasets folder with prompt, chosen and rejected
    columns.
    """

    # --- important (seed defaults) ---
    learning_rate: float = Field(default=1e-5, gt=0)
    """Adam learning rate of the LoRA adapter (its peak, under lr_schedule)."""
    dpo_beta: float = Field(default=0.1, gt=0)
    """DPO's beta: how strongly the policy is held to the reference (the base model); higher stays closer."""
    batch_size: int = Field(default=256, ge=1)
    """Preference pairs per optimizer step (an epoch's last batch may be smaller)."""
    num_epochs: int = Field(default=1, ge=1)
    """Passes over the training pairs."""
    lora_rank: int = Field(default=32, ge=1)
    """Rank of the LoRA adapter."""

    # --- optional (auto-generated when unset) ---
    log_path: str | None = None
    """Run folder; none = experiments/dataset{N}_{model}_lr{lr}_beta{beta}_{date}/ under the experiments folder."""
    wandb_project: str | None = None
    """Weights & Biases project to log to (ENTITY/PROJECT also works); none = DPO_WANDB_PROJECT, else no W&B."""
    wandb_name: str | None = None
    """W&B run name; none = the run folder's name."""

    # --- training details ---
    max_length: int = Field(default=1024, ge=8)
    """Tokens per rendered prompt + response; longer ones are truncated."""
    # As tinker-cookbook: a paid run killed at step 150 resumes from step 140, not from zero. 0 = only `final`.
    save_every: int = Field(default=20, ge=0)
    """Save a resumable checkpoint every this many steps; 0 = only the final one."""
    # As tinker-cookbook: periodic checkpoints expire on the service after 7 days, the final one never.
    checkpoint_ttl: int | None = Field(default=7 * 24 * 3600, ge=3600)
    """Seconds the service keeps each periodic checkpoint (at least 3600); none = until deleted. The final
    checkpoint is always kept.
    """
    seed: int = 0
    """Seed of the LoRA initialisation, the data order, the held-out split and the max_pairs subset."""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """How the learning rate moves over the run: linear (decays to 0), cosine (decays to 0) or constant."""
    renderer_name: str | None = None
    """tinker-cookbook renderer (chat format) used by training, evaluation and sampling alike; none = the model's
    default. Recorded in config.json.
    """
    resume: bool = True
    """Continue an unfinished run folder of the same experiment (same config and dataset bytes); false = never
    reuse a folder.
    """
    allow_few_steps: bool = False
    """Run a plan of fewer than 10 optimizer steps anyway (refused by default: too few to move an adapter)."""
    dry_run: bool = False
    """Print the plan (steps, tokens to train, sample and score, cost where DPO_PRICE_TABLE prices the model) and
    exit without training.
    """

    # --- starting point (tinker-cookbook's load_checkpoint_path) ---
    load_checkpoint_path: str | None = None
    """Start from this training checkpoint's weights (tinker://RUN/weights/NAME, e.g. an SFT run's state_path) instead
    of the base model, and use it as the DPO reference; none = the base model. Its LoRA rank is lora_rank's.
    """

    # --- loss (TRL's DPOTrainer names; dpo_core/loss.py has the formulas) ---
    loss_type: Literal["sigmoid", "ipo", "robust", "sigmoid_norm"] = "sigmoid"
    """DPO loss: sigmoid (the paper's), ipo (squared, on per-token mean log-ratios), robust (unbiased under label
    noise label_smoothing) or sigmoid_norm (sigmoid on per-token mean log-ratios: length-normalised, so a response
    is not preferred for its length).
    """
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """Assumed share of flipped preference labels: conservative DPO for sigmoid, the noise rate for robust."""
    nll_weight: float = Field(default=0.0, ge=0)
    """Weight of an NLL term on the chosen responses (per token) added to the loss (RPO; TRL's rpo_alpha); 0 = none."""

    # --- run control (0 / none = disabled, as in tinker-cookbook) ---
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps (the learning-rate schedule spans them); none = num_epochs' steps."""
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    """Adam's beta1 (first-moment decay)."""
    adam_beta2: float = Field(default=0.95, ge=0, lt=1)
    """Adam's beta2 (second-moment decay)."""
    adam_eps: float = Field(default=1e-8, gt=0)
    """Adam's epsilon."""
    eval_every: int = Field(default=0, ge=0)
    """Held-out DPO metrics every this many steps (and at the end), whether or not a checkpoint is saved there;
    0 = at every saved checkpoint.
    """

    # --- held-out evaluation (never trained on; DPO metrics before training and at every saved checkpoint) ---
    held_out_fraction: float = Field(default=0.1, ge=0, lt=1)
    """Share of the pairs (whole prompts) never trained on: DPO metrics on them before training and at every
    checkpoint; 0 = none.
    """
    held_out_min_pairs: int = Field(default=8, ge=1)
    """Hold out at least this many pairs; a dataset of fewer than twice this many holds out none."""
    # For a first look at a large dataset, and the quick preset.
    max_pairs: int | None = Field(default=None, ge=2)
    """Use only a seeded subset of this many pairs (whole prompts, held-out split included); none = all."""
    # At step 0 the adapter is zero, so the policy is the reference: loss ln 2, margins only numeric noise.
    reference_check_tolerance: float = Field(default=1e-3, ge=0)
    """Stop the run when the first batch's DPO loss is further than this from ln 2 (or its mean margin further
    than twice this from 0): the reference logprobs were then computed on other weights; 0 = no check.
    """

    @field_validator("dataset")
    @classmethod
    def _dataset_known(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value not in (1, 2, 3):
            raise ValueError(f"dataset must be 1, 2, 3 or a path to a dataset file, got {value}")
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            number = int(value)
            if number not in (1, 2, 3):
                raise ValueError(f"dataset must be 1, 2, 3 or a path to a dataset file, got {number}")
            return number
        return value

    @model_validator(mode="after")
    def _smoothing_has_a_loss(self) -> TrainConfig:
        check_label_smoothing([self.loss_type], self.label_smoothing)
        return self

    @field_validator("load_checkpoint_path")
    @classmethod
    def _training_checkpoint(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("tinker://") and "/weights/" in value):
            raise ValueError("load_checkpoint_path must be a training checkpoint, tinker://RUN/weights/NAME (a run's "
                             f"state_path in checkpoints.jsonl), got {value!r}")
        return value

    @field_validator("model_name")
    @classmethod
    def _model_nonempty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model_name must not be empty")
        return value.strip()


def check_label_smoothing(loss_types: list[str], label_smoothing: float) -> None:
    """label_smoothing is read by the sigmoid and robust losses only: with ipo or sigmoid_norm it would do nothing."""
    ignored = [t for t in loss_types if t in ("ipo", "sigmoid_norm")]
    if label_smoothing and ignored:
        raise ValueError(f"label_smoothing={label_smoothing:g} has no effect with loss_type={ignored[0]} (it applies "
                         "to sigmoid and robust); drop it or choose one of those")


def model_slug(model_name: str) -> str:
    """Short model tag used in run names: `Qwen/Qwen3-4B-Instruct-2507` -> `qwen34b`.

    Rule: take the part after the last `/`, drop an `-Instruct` suffix (and a release tag such as
    `-2507` after it), lower-case, keep only letters and digits. `Qwen/Qwen3-8B` -> `qwen38b`,
    `Qwen/Qwen3-30B-A3B-Instruct-2507` -> `qwen330ba3b`, `local/tiny` -> `tiny`.
    """
    base = model_name.rstrip("/").split("/")[-1]
    base = re.sub(r"-instruct(-\d+)?$", "", base, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]", "", base.lower())


def dataset_tag(dataset: int | str) -> str:
    """`1` -> `dataset1`; a path -> `dataset-<file stem>` (letters, digits, `-` and `_` only)."""
    if isinstance(dataset, int):
        return f"dataset{dataset}"
    stem = Path(str(dataset)).name.split(".")[0]
    return "dataset-" + re.sub(r"[^A-Za-z0-9_-]", "", stem)


def run_name(config: TrainConfig, date: dt.date | None = None) -> str:
    """The seed's naming: `dataset1_qwen34b_lr1e-05_beta0.1_2024-12-05`; a training seed other than 0 adds
    `_seed{N}` (the suite's `seeds=N` replicates)."""
    date = date or dt.date.today()
    return (
        f"{dataset_tag(config.dataset)}_{model_slug(config.model_name)}"
        f"_lr{config.learning_rate:g}_beta{config.dpo_beta:g}{loss_tag(config)}_{date.isoformat()}"
        + (f"_seed{config.seed}" if config.seed else "")
    )


def loss_tag(config: TrainConfig) -> str:
    """`` for the default sigmoid loss, else `_ipo`, `_robust0.1`, `_sigmoid_norm`, `_rpo0.5` (a loss sweep's names
    differ)."""
    tag = "" if config.loss_type == "sigmoid" and not config.label_smoothing else f"_{config.loss_type}"
    if config.label_smoothing:
        tag += f"{config.label_smoothing:g}"
    return tag + (f"_rpo{config.nll_weight:g}" if config.nll_weight else "")


# Fields that decide whether an existing run folder is "the same experiment" (resumable).
_IDENTITY_EXCLUDE = {"log_path", "wandb_project", "wandb_name", "resume", "num_epochs", "save_every",
                     "allow_few_steps", "eval_every", "dry_run", "reference_check_tolerance", "checkpoint_ttl"}


def identity(config: TrainConfig, dataset_sha256: str | None = None, service: str | None = None) -> dict[str, Any]:
    """What must match for a rerun to continue an existing folder (epochs may be extended): the config and,
    when known, the dataset's content hash (a regenerated dataset under the same path is another experiment) and
    the service identity (`ServiceIdentity.key()`: a run's checkpoints and reference belong to its service)."""
    return {**config.model_dump(exclude=_IDENTITY_EXCLUDE, mode="json"), "dataset_sha256": dataset_sha256,
            "service": service}


def _same_experiment(existing: dict[str, Any] | None, config: TrainConfig, dataset_sha256: str | None,
                     service: str | None = None) -> bool:
    if existing is None:
        return False
    known = {**existing}
    if known.get("dataset_sha256") is None or dataset_sha256 is None:  # a config.json without the hash
        known["dataset_sha256"] = dataset_sha256 = None
    # A caller that names no service compares none; one that does never resumes a folder of an unknown service
    # (a config.json written before services were recorded): its checkpoints may live elsewhere.
    if service is None:
        known["service"] = None
    return known == identity(config, dataset_sha256, service)


# ----------------------------------------------------------------------------------------------
# How many optimizer steps a plan makes
# ----------------------------------------------------------------------------------------------

# Fewer steps than this barely move a LoRA adapter and waste a paid run (batch 256 on the 140 shipped pairs is ONE step).
MIN_STEPS = 10


def num_steps(num_pairs: int, batch_size: int, num_epochs: int) -> int:
    """Optimizer steps of a run: batches per epoch (the last one may be partial) x epochs."""
    return math.ceil(num_pairs / batch_size) * num_epochs


def held_out_size(num_pairs: int, fraction: float, min_pairs: int) -> int:
    """Pairs a run holds out (dpo_core.data.held_out_split; it may round up to whole prompts): none when
    `fraction` is 0 or the dataset has fewer than 2 x `min_pairs` pairs, else max(ceil(fraction * n), min_pairs)."""
    if fraction <= 0 or num_pairs < 2 * max(min_pairs, 1):
        return 0
    return max(math.ceil(fraction * num_pairs), min_pairs)


def check_step_count(config: TrainConfig, num_pairs: int, source: str) -> None:
    """Refuse a plan of fewer than MIN_STEPS optimizer steps (unless `allow_few_steps`), naming the count and the
    fixes: a smaller batch_size, more pairs, or more epochs."""
    total = num_pairs if config.max_pairs is None else min(num_pairs, config.max_pairs)
    held = held_out_size(total, config.held_out_fraction, config.held_out_min_pairs)
    num_pairs = total - held  # the held-out pairs are never trained on
    steps = num_steps(num_pairs, config.batch_size, config.num_epochs)
    if config.max_steps is not None and config.max_steps < steps:
        if config.max_steps >= MIN_STEPS or config.allow_few_steps:
            return
        raise ConfigError(f"{source}: max_steps={config.max_steps} is fewer than {MIN_STEPS} optimizer steps; raise "
                          "max_steps, or allow_few_steps=true to run it anyway")
    if steps >= MIN_STEPS or config.allow_few_steps:
        return
    per_epoch = math.ceil(MIN_STEPS / config.num_epochs)
    batch = next((b for b in range(min(config.batch_size, num_pairs), 0, -1) if math.ceil(num_pairs / b) >= per_epoch),
                 None)
    epochs = math.ceil(MIN_STEPS / math.ceil(num_pairs / config.batch_size))
    fixes = ([f"batch_size={batch}"] if batch else []) + [
        f"more pairs (>= {(per_epoch - 1) * config.batch_size + 1 + held} at this batch size)", f"num_epochs={epochs}"]
    held_note = f" ({held} held out)" if held else ""
    raise ConfigError(
        f"{source}: {total} pairs{held_note} at batch_size={config.batch_size} for num_epochs={config.num_epochs} make "
        f"{steps} optimizer step{'s' if steps != 1 else ''} (fewer than {MIN_STEPS}); use {', or '.join(fixes)}; "
        "or allow_few_steps=true to run it anyway")


def choose_run_dir(config: TrainConfig, experiments_dir: Path, date: dt.date | None = None,
                   taken: frozenset[str] | set[str] = frozenset(), dataset_sha256: str | None = None,
                   service: ServiceIdentity | None = None) -> Path:
    """Pick the run folder. Never overwrites another experiment.

    - explicit `log_path`: used as is (resumed if it holds the same experiment and `resume` is on, refused if
      not: a folder is never overwritten);
    - otherwise `experiments/<run_name>`; if that folder exists with the same experiment and
      `resume` is on, it is reused (resumed); else the first free `<run_name>_2`, `_3`, ...
    Names in `taken` (folders another running process holds) are passed over. With `dataset_sha256`, a folder
    trained on other bytes of the same dataset path is another experiment; with `service`, so is a folder trained
    on another service (other weights, or checkpoints that live elsewhere).
    """
    service_key = service.key() if service is not None else None
    if config.log_path:
        path = Path(config.log_path)
        existing = _read_identity(path)
        if (existing is not None and _same_experiment(existing, config, dataset_sha256)
                and not _same_experiment(existing, config, dataset_sha256, service_key)):
            raise ConfigError(f"log_path {path} was trained on {_service_of(path)}; this run's service is "
                              f"{service.describe()}. Its checkpoints and reference belong to that service: choose "
                              "another log_path to train a new run here, or point the backend back at that service")
        if existing is not None and not _same_experiment(existing, config, dataset_sha256, service_key):
            raise ConfigError(
                f"log_path {path} holds a different experiment (config.json or the dataset's sha256 differs); "
                "choose another log_path or delete that folder"
            )
        if existing is not None and not config.resume:
            raise ConfigError(f"log_path {path} already holds this experiment and resume=false; "
                              "set resume=true to continue it, or choose another log_path")
        return path
    base = run_name(config, date)
    candidate = experiments_dir / base
    suffix = 1
    while candidate.exists() or candidate.name in taken:
        if candidate.name not in taken and config.resume:
            existing = _read_identity(candidate)
            if _same_experiment(existing, config, dataset_sha256, service_key):
                return candidate
            if service is not None and _same_experiment(existing, config, dataset_sha256):
                logging.getLogger("dpo_core").warning(
                    "%s holds this experiment trained on %s; this service is %s: training a new run beside it",
                    candidate, _service_of(candidate), service.describe())
        suffix += 1
        candidate = experiments_dir / f"{base}_{suffix}"
    return candidate


def _read_identity(run_dir: Path) -> dict[str, Any] | None:
    config_file = run_dir / "config.json"
    if not config_file.exists():
        return None if not run_dir.exists() or not any(run_dir.iterdir()) else {"__unknown__": True}
    from dpo_core.records import RunConfig  # records builds on this module's TrainConfig

    try:
        service = RunConfig.read_service(run_dir)
        return identity(RunConfig.read_train_config(run_dir), RunConfig.read_dataset_sha256(run_dir),
                        service.key() if service is not None else None)
    except (ValueError, ValidationError):
        return {"__unknown__": True}


def _service_of(run_dir: Path) -> str:
    from dpo_core.records import RunConfig

    service = RunConfig.read_service(run_dir)
    return service.describe() if service is not None else "a service it does not record (an older config.json)"


# ----------------------------------------------------------------------------------------------
# key=value command lines (the seed's CLI style)
# ----------------------------------------------------------------------------------------------


def parse_key_values(argv: list[str], model: type[BaseModel]) -> dict[str, str]:
    """Parse `key=value` arguments; unknown keys raise ConfigError listing the valid ones."""
    valid = list(model.model_fields)
    values: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            hint = f" (give {key} a value: {key}=...)" if key in model.model_fields else ""
            raise ConfigError(f"expected key=value, got {arg!r}{hint}; valid keys: {', '.join(valid)}; "
                              "--help describes them")
        if key not in model.model_fields:
            guesses = closest_keys(key, valid)
            hint = f" (did you mean {' or '.join(repr(g) for g in guesses)}?)" if guesses else ""
            raise ConfigError(f"unknown key {key!r}{hint}; valid keys: {', '.join(valid)}; --help describes them")
        values[key] = value
    return values


def closest_keys(key: str, valid: list[str]) -> list[str]:
    """The valid key(s) `key` most likely meant: the closest spelling (`betta` -> `dpo_beta`), else the keys
    with these initials (`lr` -> `learning_rate`, `lora_rank`); empty when none is close."""
    import difflib

    matches = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return matches or [name for name in valid if "".join(part[:1] for part in name.split("_")) == key]


def build_config(model: type[FrozenModel], values: dict[str, Any]) -> Any:
    """Validate values into a config; the first problem becomes a one-line ConfigError."""
    cleaned = {k: (None if v in ("", "None", "none", "null") else v) for k, v in values.items()}
    try:
        return model.model_validate(cleaned)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "config"
        given = values.get(str(err["loc"][0])) if err["loc"] else None
        shown = f" (got {given!r})" if given is not None else ""
        raise ConfigError(f"{key}: {err['msg']}{shown}") from None


class EvalConfig(FrozenModel):
    """How diversity is measured: k samples per eval prompt at a fixed temperature and seed."""

    eval_prompts: str = "eval_prompts.parquet"
    """Eval prompt file (prompt, creativity_score 0..1, prompt_id): a name in the data folder, or a path."""
    num_samples: int = Field(default=8, ge=2)
    """Samples per eval prompt (k) the diversity metrics compare."""
    temperature: float = Field(default=1.0, ge=0)
    """Sampling temperature."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling: sample from the smallest token set with this much probability; 1 = off."""
    max_tokens: int = Field(default=128, ge=1)
    """Tokens per sampled answer."""
    seed: int = 0
    """Sampling seed: the same seed gives the same samples."""
    max_prompts: int | None = Field(default=None, ge=1)
    """Evaluate a creativity-stratified subset of this many prompts; none = all."""
    concurrency: int = Field(default=64, ge=1)
    """Sampling requests in flight (the local server batches them)."""
    bucket_edges: tuple[float, float] = (1 / 3, 2 / 3)
    """Creativity-score edges of the low / mid / high buckets: low < edge0 <= mid < edge1 <= high."""
    bootstrap: int = Field(default=1000, ge=100)
    """Bootstrap resamples behind each confidence interval."""
    quality: bool = True
    """Score each sample's fluency: its mean token logprob under the base model."""
    quality_judge: bool = True
    """Score each sample's quality 1-10 with the judge (the base model, rating from its next-token distribution,
    dpo_core.judge): the quality signal that is NOT dataset 2's selection criterion (the logprob is).
    """

    # --- quality-aware diversity (dpo_core.novelty): what counts as a valid answer, and as a different one ---
    fluency_floor: float = -4.5
    """A sample is valid only if its mean token logprob under the base model is at least this (noise scores far
    below it; calibrated on the shipped data, docs/study.md). Needs quality=true.
    """
    truncated_is_invalid: bool = True
    """A sample cut at max_tokens is a fragment: count it as invalid for the quality-aware metrics."""
    judge_floor: float | None = Field(default=None, ge=1, le=10)
    """Also require the judge's 1-10 rating to reach this for a sample to be valid; none = the judge does not
    decide validity (at temperature 1 the 135M judge rates noise and text alike).
    """
    similarity_threshold: float = Field(default=0.75, gt=0, le=1)
    """Two samples are the same answer (one NoveltyBench class) when their embedding cosine similarity is at
    least this (calibrated on the shipped data, docs/study.md).
    """
    patience: float = Field(default=0.8, gt=0, le=1)
    """NoveltyBench's patience p: utility_k weighs the i-th sample by p^(i-1)."""
    diversity_instruction: str | None = PROMPT_BASELINE_INSTRUCTION
    """The prompting baseline: each base model is also evaluated with this instruction before every eval prompt
    (a row of the report, compared with the base model like a trained one); none = no baseline.
    """
