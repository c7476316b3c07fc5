"""The study's plan: datasets x models x hyperparameters, with defaults per backend (no Prefect here).

`SuiteConfig` is derived from `TrainConfig` field by field, so every training key (renderer_name, wandb_name,
lr_schedule with its type, ...) works from the suite and a new TrainConfig field needs no edit here.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import Field, create_model, field_validator

from dpo_core.config import LOCAL_DEFAULT_MODEL, SEED_MODELS, EvalConfig, FrozenModel, TrainConfig, run_name

# TrainConfig fields the suite sweeps over: a list of values, one experiment per combination.
SWEPT = ("learning_rate", "dpo_beta")
# Set per experiment by the plan itself. log_path names ONE run folder, which many experiments cannot share:
# the suite's runs go to the experiments folder under their seed names.
PER_EXPERIMENT = ("model_name", "dataset", "log_path")
# Whose default depends on the backend (None = the backend's default, see below).
BACKEND_DEFAULTED = ("learning_rate", "batch_size", "max_length")
LIST_FIELDS = ("datasets", "models", *SWEPT)

# Local default: the shipped datasets x SmolLM2-135M, sized so training and evaluation finish in minutes on
# 2 CPUs. lr 1e-4 rather than the seed's 1e-5 so 10 steps move a LoRA adapter measurably.
LOCAL_DEFAULTS = {"models": [LOCAL_DEFAULT_MODEL], "learning_rate": [1e-4], "batch_size": 8, "max_length": 256,
                  "eval_num_samples": 4, "eval_max_prompts": 24, "eval_max_tokens": 64}
TINKER_DEFAULTS = {"models": list(SEED_MODELS), "learning_rate": [1e-5], "batch_size": 256, "max_length": 1024,
                   "eval_num_samples": 8, "eval_max_prompts": None, "eval_max_tokens": 256}
# `preset=quick`: the fast rehearsal of the offline suite (every stage runs, on less work), laid over the
# backend's defaults; keys given explicitly still win. Half the tokens per pair, half the steps (16 pairs a step:
# 5 steps on the 80 shipped pairs), 6 eval prompts (2 per creativity bucket) x k=2 x 32 tokens. Its numbers are
# a smoke test of the pipeline, not a finding: use the default settings for the study.
PRESETS = {"default": {}, "quick": {"batch_size": 16, "max_length": 128, "eval_num_samples": 2,
                                    "eval_max_prompts": 6, "eval_max_tokens": 32}}


def _experiment_fields() -> dict[str, Any]:
    """TrainConfig's fields as suite fields: swept ones become lists, backend-defaulted ones optional."""
    fields: dict[str, Any] = {}
    for name, info in TrainConfig.model_fields.items():
        if name in PER_EXPERIMENT:
            continue
        # The constraints (gt=0, ge=1, ...) travel with the type, so the suite refuses what TrainConfig refuses.
        constrained = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        if name in SWEPT:
            default = None if name in BACKEND_DEFAULTED else [info.default]
            fields[name] = (list[constrained] | None, default)
        elif name in BACKEND_DEFAULTED:
            fields[name] = (constrained | None, None)
        else:
            fields[name] = (info.annotation, info)
    return fields


class _SuiteFields(FrozenModel):
    """What to cross; the experiment fields (from TrainConfig) and the evaluation fields follow."""

    datasets: list[int | str] = Field(default_factory=lambda: [1, 2, 3])
    models: list[str] | None = None

    @field_validator("datasets")
    @classmethod
    def _numbers_as_ints(cls, values: list[int | str]) -> list[int | str]:
        # The same rule as TrainConfig.dataset: "1" means dataset 1; "4" is an error.
        return [TrainConfig._dataset_known(v) for v in values]


SuiteConfig = create_model(
    "SuiteConfig", __base__=_SuiteFields, __module__=__name__,
    __doc__="The whole study. Unset fields take the backend's defaults (Tinker: the seed's 3 datasets x 3 models).",
    **_experiment_fields(),
    preset=(Literal[tuple(PRESETS)], "default"),
    evaluate=(bool, True),
    eval_num_samples=(int | None, Field(default=None, ge=2)),
    eval_max_prompts=(int | None, Field(default=None, ge=1)),
    eval_max_tokens=(int | None, Field(default=None, ge=1)),
    eval_temperature=(float, Field(default=1.0, ge=0)),
    eval_prompts=(str, "eval_prompts.parquet"),
    report_dir=(str, "reports/latest"),
)


def plan(config: SuiteConfig, backend: str) -> tuple[list[TrainConfig], EvalConfig]:
    """Every experiment (dataset x model x lr x beta, in that order) and the evaluation settings."""
    defaults = {**(TINKER_DEFAULTS if backend == "tinker" else LOCAL_DEFAULTS), **PRESETS[config.preset]}
    shared = {name: getattr(config, name) for name in TrainConfig.model_fields
              if name not in PER_EXPERIMENT and name not in SWEPT}
    for name in BACKEND_DEFAULTED:
        if name in shared and shared[name] is None:
            shared[name] = defaults[name]
    models = config.models or defaults["models"]
    rates = config.learning_rate or defaults["learning_rate"]
    experiments = [
        TrainConfig(model_name=model, dataset=dataset, learning_rate=lr, dpo_beta=beta, **shared)
        for dataset, model, lr, beta in itertools.product(config.datasets, models, rates, config.dpo_beta)
    ]
    eval_config = EvalConfig(
        eval_prompts=config.eval_prompts,
        num_samples=config.eval_num_samples or defaults["eval_num_samples"],
        max_prompts=config.eval_max_prompts if config.eval_max_prompts is not None else defaults["eval_max_prompts"],
        max_tokens=config.eval_max_tokens or defaults["eval_max_tokens"],
        temperature=config.eval_temperature, seed=config.seed,
    )
    return experiments, eval_config


class SuitePlan(FrozenModel):
    """The suite's experiments (each with its run name, the subflow's name in the UI) and evaluation settings."""

    experiments: list[TrainConfig]
    run_names: list[str]
    eval_config: EvalConfig


def plan_suite(config: SuiteConfig, backend: str) -> SuitePlan:
    """`plan` as one record, for a flow to pass along."""
    experiments, eval_config = plan(config, backend)
    return SuitePlan(experiments=experiments, run_names=[run_name(e) for e in experiments], eval_config=eval_config)


def split_lists(values: dict[str, str]) -> dict[str, object]:
    """`datasets=1,2` -> ["1", "2"] for the list fields of SuiteConfig."""
    return {k: ([p.strip() for p in v.split(",") if p.strip()] if k in LIST_FIELDS and isinstance(v, str) else v)
            for k, v in values.items()}
