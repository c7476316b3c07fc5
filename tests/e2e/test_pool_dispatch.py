"""End to end, across processes as across machines: `deployments/dpo.sh up` with two process workers (one flow
run each at a time), then `python flows/suite.py dispatch=pool ...`: each experiment is a run of the
`dpo-train/default` deployment, run by a worker of the pool, and the suite collects them and writes the report.
Every process shares the experiments folder, the reference cache, server storage and Prefect result storage."""

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

_TRAIN_RUNS = """
import json
from prefect import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["dpo-train"])))
    print(json.dumps([{"id": str(r.id), "name": r.name, "state": r.state.name,
                       "parent": str(r.parent_task_run_id) if r.parent_task_run_id else None} for r in runs]))
"""

# Both workers of the pool online (their first heartbeat comes as they start polling), within 5 minutes.
_WORKERS_ONLINE = """
import sys, time
from prefect import get_client
with get_client(sync_client=True) as client:
    deadline = time.monotonic() + 300
    while True:
        online = [w.name for w in client.read_workers_for_work_pool("dpo-local")
                  if getattr(w.status, "value", w.status) == "ONLINE"]
        if len(online) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
print(online)
sys.exit(0 if len(online) >= 2 else 1)
"""


@pytest.mark.minutes(8)
def test_pool_dispatch_runs_experiments_on_the_workers(tmp_path, registered):
    port = free_port()
    env = dpo_sh_env(tmp_path, registered, port)
    env.update({
        # Two workers that take one flow run each at a time, polling often, so two experiments go one to each.
        "DPO_WORKERS": "2", "DPO_WORKER_LIMIT": "1", "PREFECT_WORKER_QUERY_SECONDS": "2",
    })
    api = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    run_dir = tmp_path / "prefect-home" / "run"
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        status = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=60)
        assert "worker: running" in status.stdout and "worker-2: running" in status.stdout, status.stdout
        # Both polling before the suite submits its runs: a worker still starting up (slow on a loaded machine)
        # would leave both runs to the other one, one after the other.
        online = subprocess.run([sys.executable, "-c", _WORKERS_ONLINE], env=api, capture_output=True, text=True,
                                timeout=360, cwd=ROOT)
        assert online.returncode == 0, online.stdout + online.stderr[-2000:]

        suite = subprocess.run(
            [sys.executable, "flows/suite.py", "dispatch=pool", "datasets=1,2", "models=local/tiny",
             "learning_rate=0.001", "batch_size=32", "allow_few_steps=true", "max_length=128", "eval_num_samples=2",
             "eval_max_prompts=3",
             "eval_max_tokens=8", f"report_dir={tmp_path / 'report'}"],
            env=api, capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-3000:]

        # Both experiments trained, by deployment runs of dpo-train, each a child of the suite's run.
        probe = subprocess.run([sys.executable, "-c", _TRAIN_RUNS], env=api, capture_output=True, text=True,
                               timeout=120, cwd=ROOT)
        assert probe.returncode == 0, probe.stderr[-3000:]
        train_runs = json.loads(probe.stdout.strip().splitlines()[-1])
        assert len(train_runs) == 2 and all(r["state"] == "Completed" and r["parent"] for r in train_runs)
        assert sorted(r["name"].split("_")[0] for r in train_runs) == ["dataset1", "dataset2"]
        # Each ran on exactly one worker of the pool: the flow run's own engine logs ("Flow run '<name>' - Finished
        # in state ...") land in the log of the worker whose process ran it. The run's id is no proof: both workers
        # may claim a run, and the loser logs the id with "Aborted submission". Which worker takes which run is
        # Prefect's scheduling choice, not a guarantee, so the test does not assert one run per worker.
        logs = {name: (run_dir / f"{name}.log").read_text() for name in ("worker", "worker-2")}
        for run in train_runs:
            ran = f"Flow run '{run['name']}' - Finished in state Completed"
            takers = [name for name, log in logs.items() if ran in log]
            assert len(takers) == 1, f"{run['name']}: ran by {takers}; logs: {[l[-1500:] for l in logs.values()]}"

        # The report is complete: the base model and both experiments.
        report = (tmp_path / "report" / "report.md").read_text()
        assert all(r["name"] in report for r in train_runs), report[:2000]
        assert len(list((tmp_path / "experiments").glob("dataset*_tiny_*/checkpoints.jsonl"))) == 2
    finally:
        down = subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0
    status = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=60)
    assert "server: stopped" in status.stdout and "worker: stopped" in status.stdout
    assert "worker-2: stopped" in status.stdout
