"""SIGTERM of `python flows/suite.py` leaves no orphaned process and a resumable run folder."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_core import data
from dpo_core.records import RunConfig
from tests.helpers.shipped import shipped_slice

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["models=local/tiny", "datasets=1", "batch_size=4", "max_length=128", "evaluate=false"]


def _group_alive(pgid: int) -> list[str]:
    listing = subprocess.run(["ps", "-o", "pid=,pgid=,args=", "-e"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if line.split()[1] == str(pgid)]


@pytest.mark.minutes(6)
def test_sigterm_stops_everything_and_the_rerun_resumes(tmp_path, registered):
    env = {**os.environ, "DPO_EXPERIMENTS_DIR": str(tmp_path / "experiments"), "DPO_LOCAL_STORAGE": str(tmp_path / "s"),
           "DPO_DATA_DIR": str(shipped_slice(tmp_path / "data")), "DPO_CACHE_DIR": str(registered),
           "DPO_BACKEND": "local",
           "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
           "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, str(ROOT / "flows" / "suite.py"), *ARGS]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    metrics = None
    while time.monotonic() < deadline and metrics is None:
        found = list((tmp_path / "experiments").glob("*/metrics.jsonl"))
        metrics = found[0] if found and found[0].read_text().strip() else None
        time.sleep(0.5)
    assert metrics is not None, "training never started"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    time.sleep(1)
    assert _group_alive(process.pid) == []  # no Prefect server, worker thread host or child left behind

    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = list((tmp_path / "experiments").glob("dataset1_*"))
    assert len(runs) == 1  # the interrupted folder was continued, not duplicated
    steps = [json.loads(line)["step"] for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    held_out = len(RunConfig.read(runs[0]).held_out_rows)  # never trained on (issue 15's held-out split)
    pairs = len(data.load_pairs(data.resolve_dataset(1, env["DPO_DATA_DIR"])))
    expected = math.ceil((pairs - held_out) / 4)  # batch 4
    assert steps == list(range(expected))
