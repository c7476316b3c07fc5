"""The study's plan: datasets x models x hyperparameters, with defaults per backend (no Prefect here)."""

from __future__ import annotations

import itertools

from pydantic import Field, field_validator

from dpo_core.config import LOCAL_DEFAULT_MODEL, SEED_MODELS, EvalConfig, FrozenModel, TrainConfig

LIST_FIELDS = ("datasets", "models", "learning_rate", "dpo_beta")

# Local default: the shipped datasets x SmolLM2-135M, sized so training and evaluation finish in minutes on
# 2 CPUs. lr 1e-4 rather than the seed's 1e-5 so 10 steps move a LoRA adapter measurably.
LOCAL_DEFAULTS = {"models": [LOCAL_DEFAULT_MODEL], "learning_rate": [1e-4], "batch_size": 8, "max_length": 256,
                  "eval_num_samples": 4, "eval_max_prompts": 24, "eval_max_tokens": 64}
TINKER_DEFAULTS = {"models": list(SEED_MODELS), "learning_rate": [1e-5], "batch_size": 256, "max_length": 1024,
                   "eval_num_samples": 8, "eval_max_prompts": None, "eval_max_tokens": 256}


class SuiteConfig(FrozenModel):
    """The whole study. Unset fields take the backend's defaults (Tinker: the seed's 3 datasets x 3 models)."""

    datasets: list[int | str] = Field(default_factory=lambda: [1, 2, 3])
    models: list[str] | None = None
    learning_rate: list[float] | None = None
    dpo_beta: list[float] = Field(default_factory=lambda: [0.1])
    batch_size: int | None = Field(default=None, ge=1)
    num_epochs: int = Field(default=1, ge=1)
    lora_rank: int = Field(default=32, ge=1)
    max_length: int | None = Field(default=None, ge=8)
    save_every: int = Field(default=0, ge=0)
    seed: int = 0
    lr_schedule: str = "linear"
    wandb_project: str | None = None
    evaluate: bool = True
    eval_num_samples: int | None = Field(default=None, ge=2)
    eval_max_prompts: int | None = Field(default=None, ge=1)
    eval_max_tokens: int | None = Field(default=None, ge=1)
    eval_temperature: float = Field(default=1.0, ge=0)
    eval_prompts: str = "eval_prompts.parquet"
    report_dir: str = "reports/latest"

    @field_validator("datasets")
    @classmethod
    def _numbers_as_ints(cls, values: list[int | str]) -> list[int | str]:
        # The same rule as TrainConfig.dataset: "1" means dataset 1; "4" is an error.
        return [TrainConfig._dataset_known(v) for v in values]


def plan(config: SuiteConfig, backend: str) -> tuple[list[TrainConfig], EvalConfig]:
    """Every experiment (dataset x model x lr x beta, in that order) and the evaluation settings."""
    defaults = TINKER_DEFAULTS if backend == "tinker" else LOCAL_DEFAULTS
    models = config.models or defaults["models"]
    rates = config.learning_rate or defaults["learning_rate"]
    experiments = [
        TrainConfig(model_name=model, dataset=dataset, learning_rate=lr, dpo_beta=beta,
                    batch_size=config.batch_size or defaults["batch_size"], num_epochs=config.num_epochs,
                    lora_rank=config.lora_rank, max_length=config.max_length or defaults["max_length"],
                    save_every=config.save_every, seed=config.seed, lr_schedule=config.lr_schedule,
                    wandb_project=config.wandb_project)
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


def split_lists(values: dict[str, str]) -> dict[str, object]:
    """`datasets=1,2` -> ["1", "2"] for the list fields of SuiteConfig."""
    return {k: ([p.strip() for p in v.split(",") if p.strip()] if k in LIST_FIELDS and isinstance(v, str) else v)
            for k, v in values.items()}
