"""The seed guide's workflows through the *tinker* backend against the Tinker stand-in (issue 13).

Each runs the guide's own command as a user would (a subprocess with TINKER_API_KEY + TINKER_BASE_URL and no
HF_HUB_OFFLINE), on tiny copies of the shipped datasets (their first rows, under the registry's file names) so
that each run is >= 10 optimizer steps of a few seconds."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_core.records import RunConfig
from tests.helpers.shipped import shipped_slice
from tests.tinker_path.conftest import QWEN3_8B, ROOT, run_entry

PAIRS = 10  # x batch_size=1 = 10 steps: the fewest a plan may have without allow_few_steps
TINY_RUN = ["batch_size=1", "max_length=128"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def guide_env(tinker_env, tmp_path) -> dict[str, str]:
    return {**tinker_env, "DPO_DATA_DIR": str(shipped_slice(tmp_path / "data", PAIRS)), "WANDB_MODE": "offline",
            "WANDB_SILENT": "true"}


@pytest.mark.minutes(9)
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

    # One renderer per run: training's prompt prefix is evaluation's prompt, token for token; the Qwen3-8B
    # prompt ends with the empty think block, and what the trained model samples carries no `<think>` text.
    checked = run_entry(["tests/tinker_path/check_one_renderer.py", str(run_dir)], guide_env, ROOT, timeout=600)
    assert checked.returncode == 0, checked.stderr[-3000:]
    found = json.loads(checked.stdout.strip().splitlines()[-1])
    assert found["renderer_name"] == "qwen3_disable_thinking" and found["prefix_equal"]
    assert found["eval_prompt_end"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert len(found["sample_texts"]) == 2 and not any("<think>" in text for text in found["sample_texts"])

    # Workflow 2: a β sweep reuses the reference logprobs the first run computed (one cache file, untouched).
    [reference] = (tmp_path / "client-cache" / "reference").glob("*.npy")
    computed_at = reference.stat().st_mtime_ns
    swept = run_entry(["scripts/train_dpo.py", f"model_name={QWEN3_8B}", "dataset=1", "dpo_beta=0.2",
                       "wandb_project=team-name/cs329x-dpo", "max_length=128",
                       "batch_size=10", "allow_few_steps=true"],  # 1 step: the reference is what is under test
                      guide_env, ROOT)
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in (tmp_path / "client-cache" / "reference").glob("*.npy")] == [computed_at]
    assert (run_dir.parent / run_dir.name.replace("beta0.1", "beta0.2") / "checkpoints.jsonl").exists()


@pytest.mark.minutes(7)
def test_workflow_3_default_models_replace_retired_ones_and_train_what_is_served(guide_env, tmp_path):
    report_dir = tmp_path / "report"
    done = run_entry(["flows/suite.py", "datasets=1,2,3", *TINY_RUN, "eval_num_samples=2", "eval_max_prompts=3",
                      "eval_max_tokens=8", f"report_dir={report_dir}"], guide_env, ROOT, timeout=1500)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]  # Completed: Qwen3-8B ran on all three datasets
    runs = sorted(p.name.split("_")[0:2] for p in (tmp_path / "experiments").glob("dataset*"))
    assert runs == [["dataset1", "qwen38b"], ["dataset2", "qwen38b"], ["dataset3", "qwen38b"]]
    # Announced in the log: the replacements, and the successors the stand-in lists but cannot train, skipped.
    assert "Qwen/Qwen3-4B-Instruct-2507 is retired on Tinker; replaced by its documented successor Qwen/Qwen3.5-4B" in output
    assert "replaced by its documented successor Qwen/Qwen3.6-35B-A3B" in output
    assert "skipping Qwen/Qwen3.5-4B" in output and "skipping Qwen/Qwen3.6-35B-A3B" in output
    report = (report_dir / "report.md").read_text()
    notes = report.split("\n\n", 3)[1:3]  # the block right under the title
    assert "Plan notes" in report and any("Qwen/Qwen3.5-4B" in block for block in notes), report[:1500]
    assert "Qwen3-30B-A3B-Instruct-2507" in report
    # The evaluation of Qwen3-8B (base and trained) sampled answers, not reasoning.
    samples = [json.loads(line) for f in (tmp_path / "experiments").rglob("samples.jsonl")
               for line in f.read_text().splitlines()]
    assert len(samples) == 5 * 3 * 2  # base, the prompting baseline + 3 checkpoints, 3 prompts, k = 2
    assert not any("<think>" in s["text"] or "</think>" in s["text"] for s in samples)


@pytest.mark.minutes(5.5)
def test_kill_9_mid_run_at_default_save_every_then_rerun_resumes(tinker_env, tmp_path):
    pairs = 32  # 8 held out, batch 1: 24 steps, a checkpoint at step 20 (the default save_every), final at 24
    steps = pairs - 8
    env = {**tinker_env, "DPO_DATA_DIR": str(shipped_slice(tmp_path / "data", pairs))}
    command = [sys.executable, "scripts/train_dpo.py", f"model_name={QWEN3_8B}", "dataset=2", *TINY_RUN]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    experiments = tmp_path / "experiments"
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and process.poll() is None:
            registry = list(experiments.glob("dataset2_*/checkpoints.jsonl"))
            if registry and any(r["name"] == "000020" for r in _jsonl(registry[0])):
                break
            time.sleep(0.5)
        assert process.poll() is None, "the run ended before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    [run_dir] = experiments.glob("dataset2_*")
    assert [r["name"] for r in _jsonl(run_dir / "checkpoints.jsonl")] == ["000020"]

    again = run_entry(command[1:], env, ROOT)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert [p.name for p in experiments.iterdir()] == [run_dir.name]  # resumed in place, no `_2`
    assert len(RunConfig.read(run_dir).held_out_rows) == pairs - steps  # never trained on
    assert [m["step"] for m in _jsonl(run_dir / "metrics.jsonl")] == list(range(steps))  # each step once
    names = [r["name"] for r in _jsonl(run_dir / "checkpoints.jsonl")]
    assert names == ["000020", "final"]
