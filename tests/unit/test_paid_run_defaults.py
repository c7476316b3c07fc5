"""Issue 13: what a paid run on Tinker needs, checked without a server: HF offline only on the local backend,
the renderer per model, lineup-aware planning, the step-count guard, resume identity with the dataset hash,
and W&B's team/project split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_core import data
from dpo_core.config import ConfigError, TrainConfig, check_step_count, choose_run_dir, num_steps
from dpo_core.logging_sinks import wandb_target
from dpo_core.models import renderer_name_for
from dpo_core.plan import SuiteConfig, plan_suite, step_count_problems

ROOT = Path(__file__).resolve().parents[2]
# What the stand-in (and Tinker today) answers: its lineup, only Qwen3-8B trainable on the stand-in.
STANDIN_SERVED = {"Qwen/Qwen3.8-27B": False, "Qwen/Qwen3.6-35B-A3B": False, "Qwen/Qwen3.5-4B": False,
                  "Qwen/Qwen3-8B": True}


def _offline_after_bootstrap(env_extra: dict[str, str]) -> str | None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TINKER_API_KEY", "DPO_BACKEND")}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", "import os, flows.bootstrap; print(os.environ.get('HF_HUB_OFFLINE'))"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return None if out.stdout.strip() == "None" else out.stdout.strip()


def test_entry_points_force_hf_offline_on_the_local_backend_only():
    assert _offline_after_bootstrap({}) == "1"
    assert _offline_after_bootstrap({"TINKER_API_KEY": "tml-test"}) is None
    assert _offline_after_bootstrap({"DPO_BACKEND": "tinker", "TINKER_API_KEY": "tml-test"}) is None


def test_no_shell_entry_point_forces_hf_offline():
    for path in ("Makefile", "deployments/dpo.sh", "prefect.yaml"):
        lines = [line for line in (ROOT / path).read_text().splitlines() if not line.lstrip().startswith("#")]
        assert not any("HF_HUB_OFFLINE" in line for line in lines), path


def test_hybrid_thinking_models_default_to_disable_thinking():
    assert renderer_name_for("Qwen/Qwen3-8B") == "qwen3_disable_thinking"
    assert renderer_name_for("Qwen/Qwen3.5-4B") == "qwen3_5_disable_thinking"
    assert renderer_name_for("HuggingFaceTB/SmolLM2-135M-Instruct") == "dpo_suite/smollm2_chatml"


def test_default_study_replaces_retired_models_and_skips_what_cannot_train():
    suite = plan_suite(SuiteConfig(datasets=[1, 2, 3]), "tinker", STANDIN_SERVED)
    assert {e.model_name for e in suite.experiments} == {"Qwen/Qwen3-8B"} and len(suite.experiments) == 3
    assert suite.lineup.replaced == {"Qwen/Qwen3-4B-Instruct-2507": "Qwen/Qwen3.5-4B",
                                     "Qwen/Qwen3-30B-A3B-Instruct-2507": "Qwen/Qwen3.6-35B-A3B"}
    assert any("Qwen3-4B-Instruct-2507" in n and "Qwen/Qwen3.5-4B" in n for n in suite.lineup.notes)
    skipped = " ".join(suite.lineup.skipped)
    assert "Qwen/Qwen3.5-4B" in skipped and "Qwen/Qwen3.6-35B-A3B" in skipped and "not trainable" in skipped
    # Where the successors train (Tinker itself), the three sizes run.
    everything = dict.fromkeys(STANDIN_SERVED, True)
    trained = {e.model_name for e in plan_suite(SuiteConfig(datasets=[1]), "tinker", everything).experiments}
    assert trained == {"Qwen/Qwen3.5-4B", "Qwen/Qwen3-8B", "Qwen/Qwen3.6-35B-A3B"}


def test_an_explicit_unserved_model_is_an_error_before_training():
    with pytest.raises(ConfigError, match="Qwen3-4B-Instruct-2507.*retired.*Qwen/Qwen3.5-4B"):
        plan_suite(SuiteConfig(models=["Qwen/Qwen3-4B-Instruct-2507"]), "tinker", STANDIN_SERVED)
    with pytest.raises(ConfigError, match="not trainable"):
        plan_suite(SuiteConfig(models=["Qwen/Qwen3.5-4B"]), "tinker", STANDIN_SERVED)
    assert plan_suite(SuiteConfig(models=["Qwen/Qwen3-8B"], datasets=[1]), "tinker", STANDIN_SERVED).experiments


def test_few_steps_are_refused_with_the_count_and_the_fixes():
    config = TrainConfig(model_name="Qwen/Qwen3-8B", dataset=1)  # the seed's batch 256
    with pytest.raises(ConfigError) as refused:
        check_step_count(config, 80, "dataset1_embedding_diversity.parquet")
    message = str(refused.value)
    # 8 of the 80 pairs are held out (never trained on): 72 train, so batch 7 is the largest with 10 steps
    assert "80 pairs (8 held out) at batch_size=256" in message and "1 optimizer step " in message
    assert "batch_size=7" in message and "num_epochs=10" in message and "allow_few_steps=true" in message
    check_step_count(config.model_copy(update={"allow_few_steps": True}), 80, "x")
    check_step_count(config.model_copy(update={"batch_size": 7}), 80, "x")
    check_step_count(config.model_copy(update={"batch_size": 8, "held_out_fraction": 0.0}), 80, "x")
    assert num_steps(80, 8, 1) == 10 and num_steps(81, 8, 1) == 11


def test_the_local_default_suite_plans_at_least_ten_steps_on_the_shipped_data():
    suite = plan_suite(SuiteConfig(), "local")
    validated = {n: type("V", (), {"rows": len(data.load_pairs(data.resolve_dataset(n, ROOT / "data")))})()
                 for n in (1, 2, 3)}
    assert step_count_problems(suite.experiments, validated) == []
    seed = plan_suite(SuiteConfig(datasets=[1]), "tinker")  # batch 256 on the 140 shipped pairs: refused
    assert "1 optimizer step" in step_count_problems(seed.experiments, {1: validated[1]})[0]


def test_defaults_save_every_20_steps():
    assert TrainConfig(model_name="m/x", dataset=1).save_every == 20


def test_a_regenerated_dataset_starts_a_new_run_folder(tmp_path):
    config = TrainConfig(model_name="local/tiny", dataset=1)
    first = choose_run_dir(config, tmp_path, dataset_sha256="a" * 64)
    first.mkdir()
    (first / "config.json").write_text(json.dumps(
        {"train_config": config.model_dump(mode="json"), "dataset_sha256": "a" * 64}))
    assert choose_run_dir(config, tmp_path, dataset_sha256="a" * 64) == first
    assert choose_run_dir(config, tmp_path, dataset_sha256="b" * 64).name == first.name + "_2"
    with pytest.raises(ConfigError, match="sha256"):
        choose_run_dir(config.model_copy(update={"log_path": str(first)}), tmp_path, dataset_sha256="b" * 64)


def test_wandb_team_slash_project_is_entity_and_project():
    assert wandb_target("team-name/cs329x-dpo") == ("team-name", "cs329x-dpo")
    assert wandb_target("cs329x-dpo", "my-team") == ("my-team", "cs329x-dpo")
    assert wandb_target("cs329x-dpo") == (None, "cs329x-dpo")
