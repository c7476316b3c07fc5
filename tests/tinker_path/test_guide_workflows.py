"""The seed guide's workflows through the *tinker* backend against the Tinker stand-in (issue 13).

Each runs the guide's own command as a user would (a subprocess with TINKER_API_KEY + TINKER_BASE_URL and no
HF_HUB_OFFLINE), on tiny copies of the shipped datasets (their first rows, under the registry's file names) so
that each run is >= 10 optimizer steps of a few seconds."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from dpo_core.data import DATASET_FILES
from tests.tinker_path.conftest import QWEN3_8B, ROOT, run_entry

PAIRS = 10  # x batch_size=1 = 10 steps: the fewest a plan may have without allow_few_steps
TINY_RUN = ["batch_size=1", "max_length=128"]


def _write_guide_data(folder: Path, pairs: int = PAIRS) -> Path:
    """The registry's three files with the first `pairs` rows of the shipped ones, and the eval prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, name in DATASET_FILES.items():
        pd.read_parquet(ROOT / "data" / name).head(pairs).to_parquet(folder / name)
    shutil.copy(ROOT / "data" / "eval_prompts.parquet", folder / "eval_prompts.parquet")
    return folder


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def guide_env(tinker_env, tmp_path) -> dict[str, str]:
    return {**tinker_env, "DPO_DATA_DIR": str(_write_guide_data(tmp_path / "data")), "WANDB_MODE": "offline",
            "WANDB_SILENT": "true"}


def test_workflow_1_single_run_with_the_guides_names_and_files(guide_env, hf_hub, tmp_path):
    _, hub = hf_hub
    hub_requests_before = len(hub.requests)
    done = run_entry(["scripts/train_dpo.py", f"model_name={QWEN3_8B}", "dataset=1",
                      "wandb_project=team-name/cs329x-dpo", *TINY_RUN], guide_env, ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # The tokenizer came from the primed cache by repo id, in online mode: the loopback hub was asked.
    assert len(hub.requests) > hub_requests_before
    run_dir = tmp_path / "experiments" / f"dataset1_qwen38b_lr1e-05_beta0.1_{dt.date.today().isoformat()}"
    assert sorted(p.name for p in run_dir.iterdir() if p.is_file()) == [
        "checkpoints.jsonl", "config.json", "metrics.jsonl"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["renderer_name"] == "qwen3_disable_thinking" and config["train_config"]["save_every"] == 20
    assert "tml-" not in (run_dir / "config.json").read_text()
    metrics = _jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(PAIRS))
    final = _jsonl(run_dir / "checkpoints.jsonl")[-1]
    assert final["name"] == "final" and final["batch"] == 0 and final["epoch"] == 1
    assert final["state_path"].startswith("tinker://") and final["sampler_path"].startswith("tinker://")
    # W&B as the guide writes it: team `team-name`, project `cs329x-dpo`, run named after the folder.
    # The offline record log is protobuf: the run record's entity and project are length-prefixed strings of
    # their own (the full "team-name/cs329x-dpo" appears only inside the logged config, as wandb_project).
    [record_log] = (run_dir / "wandb").rglob("*.wandb")
    records = record_log.read_bytes()
    assert b"\x09team-name" in records and b"\x0acs329x-dpo" in records and run_dir.name.encode() in records
