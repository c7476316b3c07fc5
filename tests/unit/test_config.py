"""TrainConfig defaults and checks, the seed's run naming, and key=value parsing."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from dpo_core.config import (
    ConfigError, TrainConfig, build_config, choose_run_dir, model_slug, parse_key_values, run_name,
)

DAY = dt.date(2024, 12, 5)


def test_seed_defaults():
    config = TrainConfig(model_name="Qwen/Qwen3-4B-Instruct-2507", dataset=1)
    assert (config.learning_rate, config.dpo_beta, config.batch_size, config.num_epochs, config.lora_rank) == \
        (1e-5, 0.1, 256, 1, 32)
    assert config.log_path is None and config.wandb_project is None


@pytest.mark.parametrize("model, slug", [
    ("Qwen/Qwen3-4B-Instruct-2507", "qwen34b"),
    ("Qwen/Qwen3-8B", "qwen38b"),
    ("Qwen/Qwen3-30B-A3B-Instruct-2507", "qwen330ba3b"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2135m"),
    ("local/tiny", "tiny"),
])
def test_model_slug(model, slug):
    assert model_slug(model) == slug


def test_run_name_matches_the_seed():
    config = TrainConfig(model_name="Qwen/Qwen3-4B-Instruct-2507", dataset=1)
    assert run_name(config, DAY) == "dataset1_qwen34b_lr1e-05_beta0.1_2024-12-05"
    sweep = TrainConfig(model_name="Qwen/Qwen3-8B", dataset=3, dpo_beta=0.05, learning_rate=3e-4)
    assert run_name(sweep, DAY) == "dataset3_qwen38b_lr0.0003_beta0.05_2024-12-05"


@pytest.mark.parametrize("values, message", [
    ({"dpo_beta": "-0.1"}, "dpo_beta"),
    ({"learning_rate": "0"}, "learning_rate"),
    ({"batch_size": "0"}, "batch_size"),
    ({"lora_rank": "0"}, "lora_rank"),
    ({"dataset": "4"}, "dataset must be 1, 2, 3"),
    ({"batch_size": "eight"}, "batch_size"),
])
def test_bad_values_are_one_line_errors(values, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_config(TrainConfig, {"model_name": "local/tiny", "dataset": "1", **values})
    assert "\n" not in str(info.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown key 'betta'.*dpo_beta"):
        parse_key_values(["model_name=x", "betta=0.2"], TrainConfig)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_key_values(["dataset"], TrainConfig)


def test_frozen_and_strict():
    config = TrainConfig(model_name="m", dataset="data/x.parquet")
    with pytest.raises(Exception):
        config.dpo_beta = 0.5  # type: ignore[misc]
    with pytest.raises(Exception):
        TrainConfig(model_name="m", dataset=1, surprise=True)


def _write_config(folder, config):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train_config": config.model_dump(mode="json")}))


def test_same_day_rerun_never_overwrites(tmp_path):
    config = TrainConfig(model_name="local/tiny", dataset=1)
    first = choose_run_dir(config, tmp_path, DAY)
    assert first.name == "dataset1_tiny_lr1e-05_beta0.1_2024-12-05"
    _write_config(first, config)
    assert choose_run_dir(config, tmp_path, DAY) == first  # same experiment: resumed
    fresh = config.model_copy(update={"resume": False})
    assert choose_run_dir(fresh, tmp_path, DAY).name == first.name + "_2"
    other = config.model_copy(update={"batch_size": 8})  # same name, different experiment
    assert choose_run_dir(other, tmp_path, DAY).name == first.name + "_2"
    longer = config.model_copy(update={"num_epochs": 3})  # extending epochs continues the run
    assert choose_run_dir(longer, tmp_path, DAY) == first


def test_explicit_log_path_with_other_experiment_is_refused(tmp_path):
    config = TrainConfig(model_name="local/tiny", dataset=1, log_path=str(tmp_path / "run"))
    _write_config(tmp_path / "run", config.model_copy(update={"dpo_beta": 0.3}))
    with pytest.raises(ConfigError, match="different experiment"):
        choose_run_dir(config, tmp_path)


def test_max_steps_caps_the_plan_and_is_checked_against_the_minimum():
    from dpo_core.config import ConfigError, check_step_count

    config = TrainConfig(model_name="local/tiny", dataset=1, batch_size=2, held_out_fraction=0, max_steps=12)
    check_step_count(config, 100, "d.parquet")  # 50 steps capped at 12: fine
    with pytest.raises(ConfigError, match="max_steps=5 is fewer than 10"):
        check_step_count(config.model_copy(update={"max_steps": 5}), 100, "d.parquet")
    check_step_count(config.model_copy(update={"max_steps": 5, "allow_few_steps": True}), 100, "d.parquet")


def test_eval_every_is_not_part_of_the_experiments_identity_but_max_steps_is():
    from dpo_core.config import identity

    config = TrainConfig(model_name="local/tiny", dataset=1)
    assert identity(config) == identity(config.model_copy(update={"eval_every": 5}))
    assert identity(config) != identity(config.model_copy(update={"max_steps": 5}))
    assert identity(config) != identity(config.model_copy(update={"loss_type": "ipo"}))


def test_a_folder_of_another_service_is_another_experiment(tmp_path, caplog):
    """A run's checkpoints and reference belong to the service that trained it: a rerun elsewhere trains anew."""
    from dpo_core.service import ServiceIdentity

    stand_in = ServiceIdentity("tinker", "http://127.0.0.1:8765", "Qwen/Qwen3-8B",
                               "dpo-suite-local (stand-in tinker)", "cpu/float32", "sha256:" + "a" * 64)
    tinker = ServiceIdentity("tinker", "https://tinker.example", "Qwen/Qwen3-8B")
    config = TrainConfig(model_name="Qwen/Qwen3-8B", dataset=1)
    first = choose_run_dir(config, tmp_path, DAY, service=stand_in)
    first.mkdir()
    (first / "config.json").write_text(json.dumps({"train_config": config.model_dump(mode="json"),
                                                   "service": stand_in.record()}))
    assert choose_run_dir(config, tmp_path, DAY, service=stand_in) == first
    with caplog.at_level("WARNING", logger="dpo_core"):
        assert choose_run_dir(config, tmp_path, DAY, service=tinker).name == first.name + "_2"
    assert "training a new run beside it" in caplog.text
    with pytest.raises(ConfigError) as refused:
        choose_run_dir(config.model_copy(update={"log_path": str(first)}), tmp_path, service=tinker)
    assert "stand-in tinker" in str(refused.value) and "https://tinker.example" in str(refused.value)
    # A folder that records no service (written before services were recorded) is not resumed by one that knows.
    _write_config(tmp_path / "old", config)
    with pytest.raises(ConfigError, match="a service it does not record"):
        choose_run_dir(config.model_copy(update={"log_path": str(tmp_path / "old")}), tmp_path, service=tinker)


def test_label_smoothing_is_refused_with_a_loss_that_ignores_it():
    from pydantic import ValidationError

    from dpo_core.plan import SuiteConfig

    TrainConfig(model_name="local/tiny", dataset=1, loss_type="robust", label_smoothing=0.1)
    with pytest.raises(ValidationError, match="has no effect with loss_type=ipo"):
        TrainConfig(model_name="local/tiny", dataset=1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValidationError, match="has no effect with loss_type=sigmoid_norm"):
        SuiteConfig(loss_type=["sigmoid", "sigmoid_norm"], label_smoothing=0.2)
