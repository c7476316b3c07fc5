"""The key reference: docs/configuration.md and every entry point's `--help`, generated from the pydantic models."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from dpo_core import config_docs
from dpo_core.config import ConfigError, EvalConfig, FrozenModel, TrainConfig, parse_key_values
from dpo_core.pairs import PairsConfig
from dpo_core.plan import LOCAL_DEFAULTS, PRESETS, SuiteConfig, plan
from dpo_core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_md_is_up_to_date():
    current = (ROOT / config_docs.DOC_PATH).read_text()
    assert current == config_docs.markdown(), (
        f"{config_docs.DOC_PATH} is out of date: regenerate it with `{config_docs.REGENERATE}` (or `make docs`)")


def test_every_key_and_setting_has_a_description():
    missing = config_docs.undocumented()
    assert not missing, ("give these fields a description (an attribute docstring under the field, or "
                         f"Field(description=...)), then run `{config_docs.REGENERATE}`: {', '.join(missing)}")


@pytest.mark.parametrize("entry, model", [("train", TrainConfig), ("suite", SuiteConfig), ("evaluate", EvalConfig),
                                          ("pairs", PairsConfig)])
def test_help_lists_every_key_with_its_type_and_default(entry, model):
    text = config_docs.help_text(entry)
    assert text.startswith(f"usage: .venv/bin/python {config_docs.ENTRY_POINTS[entry].command} ")
    listed = re.findall(r"^  (\w+) +(.+)$", text, flags=re.MULTILINE)
    names = [name for name, _ in listed]
    for name in model.model_fields:
        assert name in names, f"{entry} --help misses {name}"
    line = dict(listed)
    assert line[next(iter(model.model_fields))]  # every key line carries its type and default


def test_docs_and_help_show_each_key_once_per_table_with_the_same_default():
    doc = config_docs.markdown()
    section = doc.split("## flows/train.py", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list(TrainConfig.model_fields)
    batch = next(r for r in rows if r.startswith("| `batch_size`"))
    assert "| int >= 1 | `256` |" in batch
    assert "batch_size           int >= 1; default 256" in config_docs.help_text("train")


@pytest.mark.parametrize("backend", ["local", "tinker"])
def test_suite_defaults_per_backend_are_what_the_planner_uses(backend):
    """The per-backend defaults the docs print are the values an empty `flows/suite.py` actually plans with."""
    experiments, eval_config = plan(SuiteConfig(), backend)
    planned = {"batch_size": experiments[0].batch_size, "max_length": experiments[0].max_length,
               "learning_rate": [experiments[0].learning_rate], "lr_schedule": experiments[0].lr_schedule,
               "held_out_fraction": experiments[0].held_out_fraction, "num_epochs": experiments[0].num_epochs,
               "eval_num_samples": eval_config.num_samples, "eval_max_prompts": eval_config.max_prompts,
               "eval_max_tokens": eval_config.max_tokens}
    documented = {key.name: key.defaults.get(backend, key.defaults.get(""))
                  for key in config_docs.ENTRY_POINTS["suite"].keys()}
    for name, value in planned.items():
        assert documented[name] == config_docs.show_value(value), name
    assert documented["max_parallel"] == ("1" if backend == "local" else "4")


def test_suite_table_has_a_column_per_backend_and_the_presets():
    section = config_docs.markdown().split("## flows/suite.py", 1)[1].split("\n## ", 1)[0]
    assert "| key | type | default (local) | default (tinker) | meaning |" in section
    batch = next(r for r in section.splitlines() if r.startswith("| `batch_size`"))
    assert f"| `{LOCAL_DEFAULTS['batch_size']}` | `256` |" in batch
    for name, values in PRESETS.items():
        assert f"- `{name}`:" in section
        for key, value in values.items():
            assert f"{key}={config_docs.show_value(value)}" in section


def test_settings_table_names_every_variable():
    section = config_docs.markdown().split("## Settings", 1)[1]
    for name in Settings.model_fields:
        assert f"`DPO_{name.upper()}`" in section or name in ("tinker_api_key", "wandb_api_key")
    assert "`TINKER_API_KEY` or `DPO_TINKER_API_KEY`" in section and "`WANDB_API_KEY`" in section
    # A machine's home folder never leaks into the generated file (it must be the same on every machine).
    assert str(Path.home()) not in config_docs.markdown()


def test_types_and_values_read_as_a_user_types_them():
    class Example(FrozenModel):
        rate: float = Field(default=1e-5, gt=0, description="r")
        fraction: float | None = Field(default=None, ge=0, lt=1, description="f")
        schedule: Literal["linear", "cosine"] = Field(default="linear", description="s")
        rates: list[float] = Field(default_factory=lambda: [1e-3, 1e-4], description="l")
        flag: bool = Field(default=True, description="b")

    keys = {k.name: k for k in config_docs.key_docs(Example)}
    assert (keys["rate"].type, keys["rate"].default_text()) == ("float > 0", "1e-05")
    assert (keys["fraction"].type, keys["fraction"].default_text()) == ("float >= 0, < 1, or none", "none")
    assert (keys["schedule"].type, keys["schedule"].default_text()) == ("{linear, cosine}", "linear")
    assert (keys["rates"].type, keys["rates"].default_text()) == ("list of float", "0.001,0.0001")
    assert keys["flag"].default_text() == "true"


def test_check_mode_fails_on_a_stale_file_and_names_the_command(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    assert config_docs.main(["--check", "--out", str(stale)]) == 1
    assert config_docs.REGENERATE in capsys.readouterr().err
    assert config_docs.main(["--out", str(stale)]) == 0
    assert config_docs.main(["--check", "--out", str(stale)]) == 0
    assert stale.read_text() == config_docs.markdown()


@pytest.mark.parametrize("typo, meant", [("betta", "'dpo_beta'"), ("learning-rte", "'learning_rate'"),
                                         ("batchsize", "'batch_size'"), ("lr", "'learning_rate' or 'lora_rank'")])
def test_unknown_key_names_the_closest_valid_key(typo, meant):
    with pytest.raises(ConfigError) as info:
        parse_key_values(["model_name=x", f"{typo}=1"], TrainConfig)
    assert f"(did you mean {meant}?)" in str(info.value) and "\n" not in str(info.value)


def test_a_key_far_from_every_valid_key_gets_no_guess():
    with pytest.raises(ConfigError) as info:
        parse_key_values(["zzzz=1"], TrainConfig)
    assert "did you mean" not in str(info.value) and "valid keys: model_name" in str(info.value)
