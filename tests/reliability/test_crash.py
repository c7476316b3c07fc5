"""kill -9 mid-run, rerun the same command: it resumes from the registry, no step lost or repeated, the original
reference logprobs, and the same final metrics as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_core import data
from dpo_core.rendering import renderer_name_for
from dpo_core.reference import reference_id, reference_key
from dpo_core.records import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def _steps(run_dir: Path) -> list[dict]:
    file = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.exists() else []


@pytest.mark.minutes(8)
def test_kill_9_then_rerun_resumes_exactly(tmp_path, registered):
    rows = data.load_pairs(data.resolve_dataset(1, ROOT / "data"))[:8]
    dataset = tmp_path / "pairs.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"{p.prompt_text()} ({tmp_path.name})",
                                           "chosen": p.chosen[0]["content"], "rejected": p.rejected[0]["content"]})
                               + "\n" for p in rows))
    args = [f"dataset={dataset}", "model_name=local/tiny", "batch_size=2", "num_epochs=4", "save_every=3",
            "learning_rate=2e-3", "max_length=128", "lr_schedule=constant"]

    def env(name: str) -> dict:
        return {**os.environ, "DPO_EXPERIMENTS_DIR": str(tmp_path / name), "DPO_LOCAL_STORAGE": str(tmp_path / "s"),
                "DPO_CACHE_DIR": str(registered), "DPO_BACKEND": "local",
                # Its own Prefect database: a killed run's concurrency-slot lease (300 s) must not stall others.
                "PREFECT_HOME": str(tmp_path / f"prefect-{name}"),
                "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / f"results-{name}"),
                "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / f"results-{name}")}

    command = [sys.executable, str(ROOT / "flows" / "train.py"), *args]
    process = subprocess.Popen(command, env=env("crashed"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        runs = list((tmp_path / "crashed").glob("dataset-pairs_*"))
        if runs and len(_steps(runs[0])) >= 5:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole process group: a crash, nothing gets to clean up
    process.wait(timeout=30)
    [run_dir] = list((tmp_path / "crashed").glob("dataset-pairs_*"))
    done_at_crash = len(_steps(run_dir))
    assert 5 <= done_at_crash < 16, "the crash must land mid-run"
    reference = registered / "reference" / (reference_key(
        reference_id(RunConfig.read_service(run_dir)), data.content_hash(dataset), renderer_name_for("local/tiny"),
        128) + ".npy")
    reference_bytes, reference_mtime = reference.read_bytes(), reference.stat().st_mtime_ns

    resumed = subprocess.run(command, env=env("crashed"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["step"] for m in _steps(run_dir)] == list(range(16))
    assert reference.read_bytes() == reference_bytes and reference.stat().st_mtime_ns == reference_mtime
    assert [r["name"] for r in map(json.loads, (run_dir / "checkpoints.jsonl").read_text().splitlines())][-1] == "final"

    clean = subprocess.run(command, env=env("clean"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]
    [clean_dir] = list((tmp_path / "clean").glob("dataset-pairs_*"))
    for a, b in zip(_steps(clean_dir), _steps(run_dir)):
        assert a["dpo_loss"] == pytest.approx(b["dpo_loss"], abs=1e-4)
