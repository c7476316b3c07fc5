"""The suite on a remote backend: a local server started as its own process (`python -m dpo_core.local serve`,
as on a GPU box) and reached like Tinker, through TINKER_BASE_URL + TINKER_API_KEY. Its experiments train
concurrently, with the metrics of a sequential run; a wrong key is refused."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpo_core.plan import SuiteConfig

ROOT = Path(__file__).resolve().parents[2]
KEY = "tml-remote-test-key"


@pytest.fixture(scope="module")
def remote_server(tmp_path_factory, registered):
    """A server process on loopback with a key of ours; stopped (SIGTERM) after the module."""
    storage = tmp_path_factory.mktemp("remote-storage")
    env = {**os.environ, "DPO_CACHE_DIR": str(registered), "DPO_LOCAL_STORAGE": str(storage)}
    process = subprocess.Popen([sys.executable, "-m", "dpo_core.local", "serve", "--port", "0", "--api-key", KEY],
                               env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in process.stdout:  # the first lines say where it listens, once it is ready
            found = re.search(r"ready at (http://127\.0\.0\.1:\d+)", line)
            if found:
                url = found.group(1)
                break
        assert url, "the server process ended before it was ready"
        assert KEY not in line  # a key given by the user is never printed
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture
def remote_env(project_env, monkeypatch, remote_server):
    """A user's environment for the tinker backend pointed at the remote server."""
    monkeypatch.setenv("DPO_BACKEND", "tinker")
    monkeypatch.setenv("TINKER_BASE_URL", remote_server)
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    return project_env


def test_wrong_key_is_refused(remote_server):
    import tinker

    from dpo_core.backend import service_client
    from dpo_core.settings import Settings

    settings = Settings(backend="tinker", tinker_base_url=remote_server, tinker_api_key="tml-wrong-key")
    with pytest.raises(tinker.AuthenticationError):  # on creating the session or on the first call
        with service_client(settings) as client:
            client.get_server_capabilities()


def _undated(run_dir: str) -> str:
    """The run folder's name without its date: the two suites may start either side of midnight."""
    return re.sub(r"_\d{4}-\d{2}-\d{2}", "", Path(run_dir).name)


def _metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.minutes(8.5)
def test_experiments_train_concurrently_with_sequential_results(prefect_harness, remote_env, monkeypatch):
    from flows.suite import dpo_suite

    # Three experiments (a beta sweep) of >= 10 steps each on local/tiny; no evaluation: training is the subject.
    small = dict(datasets=[2], models=["local/tiny"], learning_rate=[1e-3], dpo_beta=[0.05, 0.1, 0.2],
                 batch_size=7, max_length=128, evaluate=False)  # 11 steps on the 72 trained pairs
    runs = {}
    for label, parallel in (("parallel", None), ("sequential", 1)):
        # Separate experiments folders, so the sequential suite trains again rather than hitting the cache.
        monkeypatch.setenv("DPO_EXPERIMENTS_DIR", str(remote_env / label))
        state = dpo_suite(SuiteConfig(**small, max_parallel=parallel), return_state=True)
        assert state.is_completed(), state.message
        runs[label] = sorted(state.result()["experiments"])
    assert len(runs["parallel"]) == 3

    # On the tinker backend the default is 3 at once here: every experiment's steps overlap the others' in time.
    spans = [(m[0]["time/start"], m[-1]["time/start"] + m[-1]["time/step"])
             for m in (_metrics(run) for run in runs["parallel"])]
    assert all(len(_metrics(run)) >= 10 for run in runs["parallel"])
    latest_start, earliest_end = max(s for s, _ in spans), min(e for _, e in spans)
    assert latest_start < earliest_end, spans
    # The sequential run's experiments do not overlap: the comparison above measures something.
    seq = sorted((m[0]["time/start"], m[-1]["time/start"] + m[-1]["time/step"])
                 for m in (_metrics(run) for run in runs["sequential"]))
    assert all(a[1] <= b[0] for a, b in zip(seq, seq[1:]))

    # The same training: every metric of every step except the timings. Counts are exact; float metrics agree to
    # fp32 summation-order noise. Requests of concurrent experiments may share the engine's padded micro-batches,
    # so their matmuls reduce in another order (~1e-7 relative per sum of ~1e3 token logprobs); 1e-5 relative is
    # that noise x ~30 and far below what one different step (another batch, lr or seed) changes.
    for parallel_run, sequential_run in zip(runs["parallel"], runs["sequential"]):
        assert _undated(parallel_run) == _undated(sequential_run)
        untimed = [[{k: v for k, v in m.items() if not k.startswith("time/")} for m in _metrics(run)]
                   for run in (parallel_run, sequential_run)]
        assert len(untimed[0]) == len(untimed[1])
        beta = json.loads((Path(parallel_run) / "config.json").read_text())["train_config"]["dpo_beta"]
        for step_parallel, step_sequential in zip(*untimed):
            assert step_parallel.keys() == step_sequential.keys()
            # Rewards and margins are beta x (policy - reference) summed logprobs: differences of sums of size
            # |logps| (~500 nats here), so their noise is absolute, ~beta x |logps| x eps (measured: 6e-6 at beta
            # 0.2), not relative to the small difference itself. 16x that bound.
            scale = max(abs(step_parallel["logps/chosen"]), abs(step_parallel["logps/rejected"]), 1.0)
            reward_tol = 16 * beta * scale * float(np.finfo(np.float32).eps)
            for key, value in step_parallel.items():
                other = step_sequential[key]
                if key in ("margin", "margin_norm", "chosen_reward", "rejected_reward"):
                    assert abs(value - other) <= reward_tol, (key, value, other, reward_tol)
                elif isinstance(value, float) or isinstance(other, float):
                    assert math.isclose(value, other, rel_tol=1e-5, abs_tol=1e-6), (key, value, other)
                else:
                    assert value == other, (key, value, other)


def test_a_failed_experiment_stays_its_own_while_others_train_at_once(prefect_harness, remote_env, monkeypatch):
    """Four experiments at once (the tinker backend's default allows 4): the two on a dataset whose prompts fill
    max_length fail, each in its own dpo-train subflow, while the two on dataset 2 train to the end."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.suite import dpo_suite

    monkeypatch.setenv("DPO_EXPERIMENTS_DIR", str(remote_env / "isolation"))
    too_long = remote_env / "long_prompts.jsonl"  # valid rows; training refuses them (prompt alone > max_length)
    too_long.write_text("".join(json.dumps({"prompt": f"Question {i}: " + "tell me more " * 80, "chosen": "Yes.",
                                            "rejected": "No."}) + "\n" for i in range(4)))
    config = SuiteConfig(datasets=[2, str(too_long)], models=["local/tiny"], learning_rate=[1e-3],
                         dpo_beta=[0.05, 0.1], batch_size=7, max_length=128, evaluate=False,
                         allow_few_steps=True)  # the 4-row dataset; dataset 2 still makes 11 steps
    state = dpo_suite(config, return_state=True)

    assert state.is_failed()
    failed = state.result(raise_on_failure=False)  # the summary the suite returns with its Failed state
    assert isinstance(failed, dict), failed
    trained = sorted(Path(run) for run in failed["experiments"])
    assert [run.name.split("_")[0] for run in trained] == ["dataset2", "dataset2"]
    assert all(len(_metrics(str(run))) >= 10 for run in trained)
    assert len(failed["failed"]) == 2 and all("long_prompts" in name for name in failed["failed"])
    assert all("max_length=128" in why for why in failed["failed"].values())
    # Each experiment its own subflow page under the suite run, with its own final state.
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
    states = sorted((run.name.split("_")[0], run.state.type.value) for run in children)
    assert states == [("dataset-long", "FAILED")] * 2 + [("dataset2", "COMPLETED")] * 2, states
