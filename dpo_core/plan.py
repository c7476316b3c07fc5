"""The study's plan: datasets x models x hyperparameters, with defaults per backend (no Prefect here).

`SuiteConfig` is derived from `TrainConfig` field by field, so every training key (renderer_name, wandb_name,
lr_schedule with its type, ...) works from the suite and a new TrainConfig field needs no edit here.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from dpo_core.config import (LOCAL_DEFAULT_MODEL, PROMPT_BASELINE_INSTRUCTION, SEED_MODELS, ConfigError,
                             EvalConfig, FrozenModel, TrainConfig, check_label_smoothing, run_name)
from dpo_core.data import CONTROL_DATASET_FILES

# TrainConfig fields the suite sweeps over: a list of values, one experiment per combination.
SWEPT = ("learning_rate", "dpo_beta", "loss_type")
# Set per experiment by the plan itself. log_path names ONE run folder, which many experiments cannot share:
# the suite's runs go to the experiments folder under their seed names.
PER_EXPERIMENT = ("model_name", "dataset", "log_path")
# Whose default depends on the backend (None = the backend's default, see below).
BACKEND_DEFAULTED = ("learning_rate", "batch_size", "max_length", "num_epochs", "lr_schedule",
                     "held_out_fraction")
LIST_FIELDS = ("datasets", "models", *SWEPT)

# Local default: the shipped datasets x SmolLM2-135M, chosen from a measured sweep (README, "Offline defaults: what
# was measured") so that each dataset's held-out DPO accuracy can clear 0.5 in one epoch on 2 CPUs.
# lr 1e-3 on a constant schedule: at the seed's 1e-5, or 1e-4 decaying linearly over ~12 steps, a LoRA adapter
# barely moves (held-out loss stayed at ln 2, accuracy 3/8). held_out_fraction 0.2 (on 8 pairs a bootstrap CI
# clears 0.5 only at 7/8): 28 of the 140 shipped pairs; 16 of the earlier 80 could not resolve dataset 3's ~0.7
# from chance, hence the 140. batch 6: the 112 trained pairs make 19 steps (>= MIN_STEPS).
# The positive controls (data/control_diversity.parquet: chosen = most diverse candidate, rejected = least, no
# quality filter, the "degeneration control"; data/control_quality.parquet: DivPO's quality-preserving pairs) run
# with the first model and hyper-parameters, so the report can say whether its instrument sees a built-in effect.
# eval_max_tokens 128: SmolLM2 ends 27% / 52% / 62% of its eval samples on its own at 64 / 128 / 256 tokens
# (bench/completion_rate.json); the quality-aware metrics count a cut sample as invalid and the report shows each
# model's completion rate.
LOCAL_DEFAULTS = {"models": [LOCAL_DEFAULT_MODEL], "learning_rate": [1e-3], "lr_schedule": "constant",
                  "batch_size": 6, "num_epochs": 1, "held_out_fraction": 0.2, "max_length": 256,
                  "eval_num_samples": 4, "eval_max_prompts": 24, "eval_max_tokens": 128, "positive_control": True}
# Tinker keeps the seed guide's training defaults (TrainConfig's own).
TINKER_DEFAULTS = {"models": list(SEED_MODELS), "learning_rate": [1e-5], "batch_size": 256, "max_length": 1024,
                   **{name: TrainConfig.model_fields[name].default
                      for name in ("num_epochs", "lr_schedule", "held_out_fraction")},
                   "eval_num_samples": 8, "eval_max_prompts": None, "eval_max_tokens": 256,
                   "positive_control": False}
# `preset=quick`: the fast rehearsal of the offline suite (every stage runs, on less work), laid over the
# backend's defaults; keys given explicitly still win. A seeded 40-pair subset of each dataset (8 held out, 32
# trained in 11 steps of 3), max_length 128, 6 eval prompts (2 per bucket) x k=2 x 32 tokens. Its numbers are a
# smoke test of the pipeline, not a finding (8 held-out pairs, 6 prompts): use the defaults for the study.
PRESETS = {"default": {}, "quick": {"max_pairs": 40, "batch_size": 3, "max_length": 128, "eval_num_samples": 2,
                                    "eval_max_prompts": 6, "eval_max_tokens": 32}}


def _experiment_fields() -> dict[str, Any]:
    """TrainConfig's fields as suite fields: swept ones become lists, backend-defaulted ones optional."""
    fields: dict[str, Any] = {}
    for name, info in TrainConfig.model_fields.items():
        if name in PER_EXPERIMENT:
            continue
        # The constraints (gt=0, ge=1, ...) travel with the type, so the suite refuses what TrainConfig refuses;
        # the description travels too (--help, docs/configuration.md).
        constrained = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        if name in SWEPT:
            default = None if name in BACKEND_DEFAULTED else [info.default]
            fields[name] = (list[constrained] | None,
                            Field(default=default, description=f"{info.description} A comma-separated list sweeps "
                                                               "it: one experiment per value."))
        elif name in BACKEND_DEFAULTED:
            fields[name] = (constrained | None, Field(default=None, description=info.description))
        else:
            fields[name] = (info.annotation, info)
    return fields


class _SuiteFields(FrozenModel):
    """What to cross; the experiment fields (from TrainConfig) and the evaluation fields follow."""

    datasets: list[int | str] = Field(default_factory=lambda: [1, 2, 3])
    """Datasets to train on, comma-separated: 1, 2, 3 (the data folder's) and/or paths; a missing one is skipped
    with a warning, an invalid one fails its experiments only."""
    models: list[str] | None = None
    """Base models, comma-separated; none = the backend's default (on Tinker, the seed guide's three: a retired
    one is replaced by its documented successor, announced in the log and the report)."""

    @model_validator(mode="after")
    def _smoothing_has_a_loss(self):
        check_label_smoothing(getattr(self, "loss_type", None) or [], getattr(self, "label_smoothing", 0.0))
        return self

    @field_validator("datasets")
    @classmethod
    def _numbers_as_ints(cls, values: list[int | str]) -> list[int | str]:
        # The same rule as TrainConfig.dataset: "1" means dataset 1; "4" is an error.
        return [TrainConfig._dataset_known(v) for v in values]


SuiteConfig = create_model(
    "SuiteConfig", __base__=_SuiteFields, __module__=__name__,
    __doc__="The whole study. Unset fields take the backend's defaults (Tinker: the seed's 3 datasets x 3 models).",
    **_experiment_fields(),
    preset=(Literal[tuple(PRESETS)], Field(
        default="default", description="quick: every stage on less work, laid over the backend's defaults (a "
        "smoke test of the pipeline, not a finding); default: the backend's defaults.")),
    evaluate=(bool, Field(default=True, description="Sample and score the trained models against their base "
                          "models and write the report; false = train and register only.")),
    eval_num_samples=(int | None, Field(default=None, ge=2, description="Samples per eval prompt (k) the "
                                        "diversity metrics compare.")),
    eval_max_prompts=(int | None, Field(default=None, ge=1, description="Evaluate a creativity-stratified "
                                        "subset of this many eval prompts; none on Tinker = all.")),
    eval_max_tokens=(int | None, Field(default=None, ge=1, description="Tokens per sampled answer.")),
    eval_temperature=(float, Field(default=1.0, ge=0, description="Sampling temperature of the evaluation.")),
    eval_prompts=(str, Field(default="eval_prompts.parquet", description="Eval prompt file (prompt, "
                             "creativity_score 0..1, prompt_id): a name in the data folder, or a path.")),
    report_dir=(str, Field(default="reports/latest", description="Folder of the comparison report (report.md, "
                           "plots).")),
    # The in-process local server runs every request on one engine thread, hence 1 there.
    max_parallel=(int | None, Field(default=None, ge=1, description="Experiments trained at once; none = 4 where "
                                    "the compute is remote (Tinker, or dispatch=pool), 1 on the in-process local "
                                    "server.")),
    dispatch=(Literal["local", "pool"], Field(
        default="local", description="local: train in this process; pool: each experiment as a run of the "
        "dpo-train deployment on the dpo-local work pool (start it with deployments/dpo.sh up).")),
    seeds=(int, Field(default=1, ge=1, description="Train each condition this many times, with training seeds "
                      "seed, seed+1, ... (LoRA initialisation, data order and held-out split; recorded in each run's "
                      "config.json); the findings then resample seeds and prompts.")),
    diversity_instruction=(str | None, Field(
        default=PROMPT_BASELINE_INSTRUCTION, description="The prompting baseline: the base model is also evaluated "
        "with this instruction before every eval prompt, as a row of the report; none = no baseline.")),
    positive_control=(bool | None, Field(
        default=None, description="Also train the two positive controls (data/control_diversity.parquet: chosen = "
        "the most diverse answer, rejected = the least, no quality filter, the degeneration control; "
        "data/control_quality.parquet: DivPO's chosen = most diverse above a quality threshold, rejected = least "
        "diverse below it), so the report can say whether the instrument sees a built-in effect; none = the "
        "backend's default, with the default datasets only.")),
)


class ModelLineup(FrozenModel):
    """The models the suite trains after asking the service what it serves, and what it said about the rest."""

    models: list[str]
    replaced: dict[str, str] = {}  # seed model -> its documented successor
    notes: list[str] = []  # announcements for the log and the report (replacements)
    skipped: list[str] = []  # warnings: models that will not run, and why


def resolve_models(config: SuiteConfig, backend: str, served: dict[str, bool]) -> ModelLineup:
    """The default study's models against what the service serves (name -> trainable).

    Default models (no `models=`): a retired one is replaced by its documented successor (announced); one that
    is not served, or not trainable, is skipped with a warning, like a missing dataset. Explicit `models=`
    entries are the user's choice: any that cannot be trained is a ConfigError, before any training."""
    from dpo_core import lineup
    from dpo_core.backend import not_served_message

    if config.models:
        problems = [p for p in (not_served_message(m, served, backend) for m in config.models) if p]
        if problems:
            raise ConfigError("; ".join(problems))
        return ModelLineup(models=list(config.models))
    defaults = TINKER_DEFAULTS if backend == "tinker" else LOCAL_DEFAULTS
    models, replaced, notes, skipped = [], {}, [], []
    for model in defaults["models"]:
        successor = lineup.successor(model)
        if model not in served and successor in served:
            replaced[model] = successor
            notes.append(f"{model} is retired on Tinker; replaced by its documented successor {successor}: "
                         f"{lineup.RETIRED[model].why}")
            model = successor
        problem = not_served_message(model, served, backend)
        if problem:
            skipped.append(f"skipping {model}: {problem}")
        else:
            models.append(model)
    return ModelLineup(models=models, replaced=replaced, notes=notes, skipped=skipped)


def plan(config: SuiteConfig, backend: str, models: list[str] | None = None) -> tuple[list[TrainConfig], EvalConfig]:
    """Every experiment (dataset x model x lr x beta x loss_type, in that order) and the evaluation settings. `models`
    (from `resolve_models`) replaces the configured or default models."""
    defaults = {**(TINKER_DEFAULTS if backend == "tinker" else LOCAL_DEFAULTS), **PRESETS[config.preset]}
    shared = {name: getattr(config, name) for name in TrainConfig.model_fields
              if name not in PER_EXPERIMENT and name not in SWEPT}
    for name in BACKEND_DEFAULTED:
        if name in shared and shared[name] is None:
            shared[name] = defaults[name]
    for name, value in PRESETS[config.preset].items():  # a preset's other training keys (max_pairs), unless given
        if name in shared and name not in BACKEND_DEFAULTED and name not in config.model_fields_set:
            shared[name] = value
    models = models if models is not None else (config.models or defaults["models"])
    rates = config.learning_rate or defaults["learning_rate"]
    # seeds=N: each condition N times, with training seeds seed, seed+1, ... (LoRA init, data order; config.json)
    first_seed = shared.pop("seed")
    seeds = [first_seed + i for i in range(config.seeds)]
    experiments = [
        TrainConfig(model_name=model, dataset=dataset, learning_rate=lr, dpo_beta=beta, loss_type=loss, seed=seed,
                    **shared)
        for dataset, model, lr, beta, loss in itertools.product(config.datasets, models, rates, config.dpo_beta,
                                                                config.loss_type)
        for seed in seeds
    ]
    # By default only with the default datasets: a run narrowed to some datasets (datasets=1) asked for those.
    control = config.positive_control if config.positive_control is not None else (
        defaults["positive_control"] and "datasets" not in config.model_fields_set)
    if control and models:
        experiments += [TrainConfig(model_name=models[0], dataset=dataset, learning_rate=rates[0],
                                    dpo_beta=config.dpo_beta[0], loss_type=config.loss_type[0], seed=seed, **shared)
                        for dataset in CONTROL_DATASET_FILES for seed in seeds]
    eval_config = EvalConfig(
        eval_prompts=config.eval_prompts,
        num_samples=config.eval_num_samples or defaults["eval_num_samples"],
        max_prompts=config.eval_max_prompts if config.eval_max_prompts is not None else defaults["eval_max_prompts"],
        max_tokens=config.eval_max_tokens or defaults["eval_max_tokens"],
        temperature=config.eval_temperature, seed=config.seed,
        diversity_instruction=config.diversity_instruction,
    )
    return experiments, eval_config


class SuitePlan(FrozenModel):
    """The suite's experiments (each with its run name, the subflow's name in the UI) and evaluation settings,
    with what the service's lineup changed (announced in the log and the report)."""

    experiments: list[TrainConfig]
    run_names: list[str]
    eval_config: EvalConfig
    lineup: ModelLineup | None = None


def plan_suite(config: SuiteConfig, backend: str, served: dict[str, bool] | None = None) -> SuitePlan:
    """`plan` as one record, for a flow to pass along; with `served` (the service's models), lineup-aware."""
    resolved = resolve_models(config, backend, served) if served is not None else None
    experiments, eval_config = plan(config, backend, resolved.models if resolved else None)
    return SuitePlan(experiments=experiments, run_names=[run_name(e) for e in experiments], eval_config=eval_config,
                     lineup=resolved)


def split_lists(values: dict[str, str]) -> dict[str, object]:
    """`datasets=1,2` -> ["1", "2"] for the list fields of SuiteConfig."""
    return {k: ([p.strip() for p in v.split(",") if p.strip()] if k in LIST_FIELDS and isinstance(v, str) else v)
            for k, v in values.items()}


def step_count_problems(experiments: list[TrainConfig], validated: dict) -> list[str]:
    """Each planned experiment (on a validated dataset: `dataset -> record with .rows`) that would make fewer
    than MIN_STEPS optimizer steps, as one message each naming the count and the fixes (empty when none)."""
    from dpo_core.config import check_step_count

    problems = []
    for config in experiments:
        if config.dataset not in validated:
            continue
        try:
            check_step_count(config, validated[config.dataset].rows, f"{config.model_name} on dataset {config.dataset}")
        except ConfigError as exc:
            if str(exc) not in problems:
                problems.append(str(exc))
    return problems
# Remote compute (Tinker, or any server reached by TINKER_BASE_URL, or the pool's workers) serves several
# experiments at once; the in-process local server runs them on one engine thread, so 1 there.
REMOTE_MAX_PARALLEL = 4


def max_parallel_for(config: SuiteConfig, backend: str) -> int:
    """How many experiments the suite trains at once: `max_parallel`, else the backend's default."""
    if config.max_parallel is not None:
        return config.max_parallel
    return REMOTE_MAX_PARALLEL if backend == "tinker" or config.dispatch == "pool" else 1


def check_runnable(config: SuiteConfig, settings: Any) -> None:
    """The suite's gates that need no service, for an entry point to run before the flow starts (a user error is
    then one line, not a failed flow run): a ConfigError when the plan would train nothing (every dataset missing
    or invalid) or makes too few steps (the flow refuses that before training). A missing dataset among others
    is skipped and an invalid one gates only its own experiments, as in the flow."""
    from dpo_core.data import DatasetError, DatasetNotFoundError
    from dpo_core.experiment import validate_dataset

    experiments, _ = plan(config, settings.resolved_backend())
    validated, missing, invalid = {}, [], []
    for dataset in dict.fromkeys([*config.datasets, *(e.dataset for e in experiments)]):
        try:
            validated[dataset] = validate_dataset(dataset, settings)
        except DatasetNotFoundError as exc:
            missing.append(str(exc))
        except DatasetError as exc:
            invalid.append(str(exc))
    too_few = step_count_problems(experiments, validated)
    if too_few:
        raise ConfigError("; ".join([*too_few, *invalid]))
    if not any(e.dataset in validated for e in experiments):
        raise ConfigError("nothing to run: " + "; ".join([*invalid, *missing]))


def dry_run_plan(config: SuiteConfig, settings: Any) -> str:
    """The suite's dry-run printout: every planned experiment on a dataset that exists, and its evaluation."""
    from dpo_core.dry_run import format_plan
    from dpo_core.experiment import validate_dataset

    experiments, eval_config = plan(config, settings.resolved_backend())
    present = set()
    for dataset in dict.fromkeys(e.dataset for e in experiments):
        try:
            validate_dataset(dataset, settings)
            present.add(dataset)
        except FileNotFoundError:  # skipped by the suite too, with a warning
            continue
    return format_plan([e for e in experiments if e.dataset in present], eval_config if config.evaluate else None,
                       settings)
