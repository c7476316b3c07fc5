"""End to end: a real `prefect server`, a process worker, `prefect deploy` from prefect.yaml, and
`prefect deployment run dpo-suite/default --watch` to Completed with `local/tiny` parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.deployments import dpo_sh_env
from tests.helpers.net import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deployments" / "dpo.sh"


_PROBE = """
import json
from prefect import get_client
with get_client(sync_client=True) as client:
    limits = {l.tag: l.concurrency_limit for l in client.read_concurrency_limits(limit=50, offset=0)}
    tags = {}
    for run in client.read_task_runs():
        tags.setdefault(run.name.rsplit("-", 1)[0], []).append(sorted(run.tags))
print(json.dumps({"limits": limits, "tags": tags}))
"""


@pytest.mark.minutes(7.5)
def test_deployment_runs_to_completed_and_everything_stops(tmp_path, registered):
    port = free_port()
    env = dpo_sh_env(tmp_path, registered, port)
    params = {"config": {"datasets": [2], "models": ["local/tiny"], "learning_rate": [0.001], "batch_size": 32,
                         "max_length": 128, "eval_num_samples": 2, "eval_max_prompts": 3, "eval_max_tokens": 8,
                         "allow_few_steps": True,  # 3 steps: the deployment is under test, not learning
                         "report_dir": str(tmp_path / "report")}}
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{port}" in up.stdout
        run = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "dpo-suite/default", "--watch",
             "--params", json.dumps(params)],
            env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, capture_output=True, text=True,
            timeout=600, cwd=ROOT)
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
        assert (tmp_path / "report" / "report.md").exists()
        assert list((tmp_path / "experiments").glob("dataset2_tiny_*/checkpoints.jsonl"))
        # On a Prefect server the tasks carry their concurrency tags and the tag limits exist.
        probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                               env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, cwd=ROOT)
        assert probe.returncode == 0, probe.stderr[-3000:]
        found = json.loads(probe.stdout.strip().splitlines()[-1])
        assert {"tinker-train": 4, "tinker-sample": 8}.items() <= found["limits"].items()
        assert ["dpo", "tinker-train"] in found["tags"]["train-dpo"]
        assert ["dpo", "tinker-sample"] in found["tags"]["evaluate-diversity"]
    finally:
        down = subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0
    status = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=60)
    assert "server: stopped" in status.stdout and "worker: stopped" in status.stdout
