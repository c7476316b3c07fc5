"""`dpo-train` under the Prefect harness, and the key=value CLI's error handling."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_core import data
from dpo_core.config import TrainConfig
from dpo_core.records import RunConfig

ROOT = Path(__file__).resolve().parents[2]
CANARY = "tml-canary-3f9a1c77e0d4b2aa"


def test_train_flow_runs_registers_and_keeps_secrets_out(prefect_harness, project_env, monkeypatch):
    from flows.train import dpo_train

    monkeypatch.setenv("TINKER_API_KEY", CANARY)  # present in the environment, but backend=local
    config = TrainConfig(model_name="local/tiny", dataset=2, batch_size=16, learning_rate=1e-3, max_length=128,
                         allow_few_steps=True)  # 5 steps: the flow is under test, not learning
    state = dpo_train(config, return_state=True)
    assert state.is_completed()
    result = state.result()
    run_dir = Path(result.run_dir)
    assert run_dir.parent == project_env / "experiments"
    assert run_dir.name.startswith("dataset2_tiny_lr0.001_beta0.1_")
    assert result.final.name == "final" and result.final.sampler_path.startswith("tinker://")
    pairs = len(data.load_pairs(data.resolve_dataset(2, os.environ["DPO_DATA_DIR"])))
    trained = pairs - len(RunConfig.read(run_dir).held_out_rows)  # the held-out pairs are never trained on
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == result.steps == math.ceil(trained / 16)
    for file in list(project_env.rglob("*")):
        if file.is_file():
            assert CANARY.encode() not in file.read_bytes(), f"secret leaked into {file}"
    parameters = json.dumps(state.state_details.model_dump(mode="json"), default=str)
    assert CANARY not in parameters


def test_unknown_local_model_fails_with_the_served_list(prefect_harness, project_env):
    from flows.train import dpo_train

    state = dpo_train(TrainConfig(model_name="Qwen/Qwen3-4B-Instruct-2507", dataset=1), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "not served by the local server" in message and "HuggingFaceTB/SmolLM2-135M-Instruct" in message
    assert not (project_env / "experiments").exists() or not any((project_env / "experiments").iterdir())


def test_bad_dataset_fails_before_training_and_leaves_nothing(prefect_harness, project_env, tmp_path):
    from flows.train import dpo_train

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "same", "rejected": "same"}\n')
    state = dpo_train(TrainConfig(model_name="local/tiny", dataset=str(bad)), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "row 0" in message and "column 'rejected'" in message
    assert not (project_env / "experiments").exists()


@pytest.mark.parametrize("args, expected", [
    (["model_name=local/tiny", "dataset=1", "betta=0.2"],
     "unknown key 'betta' (did you mean 'dpo_beta'?); valid keys: model_name, dataset"),
    (["model_name=local/tiny", "dataset=4"], "dataset must be 1, 2, 3"),
    (["model_name=local/tiny", "dataset=1", "dpo_beta=-1"], "dpo_beta"),
])
def test_cli_rejects_bad_keys_and_values_in_one_line(args, expected):
    done = subprocess.run([sys.executable, str(ROOT / "flows" / "train.py"), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert expected in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
