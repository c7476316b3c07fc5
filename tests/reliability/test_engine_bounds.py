"""Issue 14: no job can stop or hold the engine: failures stay in their own future, long jobs are bounded and
cancellable, a dead or stuck engine shows on /healthz, and SIGTERM stops a busy server within 5 s."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from dpo_core.local.worker import Worker
from dpo_core.settings import Settings

TINY = "local/tiny"
LONG_SAMPLE = {"base_model": TINY, "num_samples": 16,
               "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 42, 77]}]},
               # stop=[]: never an early stop; 2000 tokens of 16 rows take far longer than any budget below
               "sampling_params": {"max_tokens": 2000, "temperature": 1.0, "seed": 1, "stop": []}}


def _poll(http: httpx.Client, request_id: str) -> httpx.Response:
    while True:
        answer = http.post("/retrieve_future", json={"request_id": request_id})
        if not (answer.headers["content-type"].startswith("application/json")
                and answer.json().get("type") == "try_again"):
            return answer


@pytest.fixture
def engine_loop():
    """A worker needs an event loop to answer futures on: one running in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _outcome(worker: Worker, request_id: str, timeout: float = 10) -> bytes:
    deadline = time.monotonic() + timeout
    while not worker.futures[request_id].done.is_set():
        assert time.monotonic() < deadline, "the future never finished"
        time.sleep(0.01)
    return worker.futures[request_id].payload


def test_a_failing_job_fails_only_its_own_future(engine_loop):
    worker = Worker(engine_loop)

    def broken():
        raise TypeError("'<' not supported between instances of 'str' and 'int'")

    failed = worker.submit("m", 1, broken)
    fine = worker.submit("m", 2, lambda: (b'{"ok": true}', "application/json"))
    assert b"TypeError" in _outcome(worker, failed) and b'"category": "server"' in _outcome(worker, failed)
    assert _outcome(worker, fine) == b'{"ok": true}'
    assert worker.health(60) is None
    with pytest.raises(Exception, match="seq_id must be an integer"):
        worker.submit("m", "3", lambda: (b"{}", "application/json"))  # refused before it can reach the queue
    worker.stop(wait_s=5)


def test_watchdog_reports_a_stuck_or_dead_engine(engine_loop):
    worker = Worker(engine_loop)
    release = threading.Event()
    worker.submit("m", 0, lambda: (release.wait(5), (b"{}", "application/json"))[1])
    time.sleep(0.3)
    assert "busy with one job" in worker.health(stuck_after_s=0.1)
    release.set()
    worker.stop(wait_s=5)
    assert "stopped" in worker.health(stuck_after_s=0.1)


def test_healthz_fails_when_the_engine_is_gone(tmp_path, registered):
    from dpo_core.local.launcher import local_server

    with local_server(Settings(cache_dir=registered, local_storage=tmp_path)) as running, httpx.Client(
            base_url=f"{running.base_url}/api/v1", headers={"X-API-Key": running.api_key}, timeout=30) as http:
        http.post("/create_session", json={"tags": [], "sdk_version": "t"})
        http.post("/asample", json={**LONG_SAMPLE, "sampling_params": {"max_tokens": 2}})
        assert http.get("/healthz").status_code == 200
        running.app.state.stop(wait_s=5)
        reply = http.get("/healthz")
        assert reply.status_code == 503 and "engine thread" in reply.json()["error"]


def test_long_sampling_is_bounded_by_the_time_budget(tmp_path, registered):
    from dpo_core.local.launcher import local_server

    settings = Settings(cache_dir=registered, local_storage=tmp_path, local_request_timeout_s=1.0)
    with local_server(settings) as running, httpx.Client(
            base_url=f"{running.base_url}/api/v1", headers={"X-API-Key": running.api_key}, timeout=30) as http:
        started = time.monotonic()
        answer = _poll(http, http.post("/asample", json=LONG_SAMPLE).json()["request_id"]).json()
        assert answer["category"] == "user" and "DPO_LOCAL_REQUEST_TIMEOUT_S" in answer["error"]
        assert time.monotonic() - started < 5
        short = {**LONG_SAMPLE, "num_samples": 1, "sampling_params": {**LONG_SAMPLE["sampling_params"], "max_tokens": 3}}
        done = _poll(http, http.post("/asample", json=short).json()["request_id"])
        assert done.headers["content-type"] == "application/x-protobuf"  # the engine serves the next request


def test_the_time_budget_counts_from_the_start_of_the_job_not_its_queueing(tmp_path, registered):
    """A study submits all its requests at once (dpo-pairs: 640 samples); one queued behind a job that used its
    whole budget must still run, with a budget of its own."""
    from dpo_core.local.launcher import local_server

    settings = Settings(cache_dir=registered, local_storage=tmp_path, local_request_timeout_s=1.5)
    with local_server(settings) as running, httpx.Client(
            base_url=f"{running.base_url}/api/v1", headers={"X-API-Key": running.api_key}, timeout=30) as http:
        # Two long jobs ahead of it, each using its whole 1.5 s (distinct top_k: never batched together), so the
        # short one waits ~3 s in the queue, twice its own budget.
        long_ids = [http.post("/asample", json={**LONG_SAMPLE, "sampling_params": {
            **LONG_SAMPLE["sampling_params"], "top_k": top_k}}).json()["request_id"] for top_k in (40, 50)]
        short = {**LONG_SAMPLE, "num_samples": 1,
                 "sampling_params": {**LONG_SAMPLE["sampling_params"], "max_tokens": 3, "top_k": 5}}
        queued_at = time.monotonic()
        queued_id = http.post("/asample", json=short).json()["request_id"]
        for long_id in long_ids:
            assert "DPO_LOCAL_REQUEST_TIMEOUT_S" in _poll(http, long_id).json()["error"]
        done = _poll(http, queued_id)
        assert time.monotonic() - queued_at > 2.5  # it waited well past a budget in the queue...
        assert done.headers["content-type"] == "application/x-protobuf"  # ...and still ran


def test_a_finished_request_keeps_its_result_when_its_batch_mate_runs_out_of_time(tmp_path, registered):
    """Requests share one batched generation; a short one that finished must not be failed when the batch
    later passes its deadline because a long batch-mate is still decoding."""
    from dpo_core.local.budget import Budget, JobInterrupted
    from dpo_core.local.launcher import local_server
    from dpo_core.local.sampler import SampleRequest

    with local_server(Settings(cache_dir=registered, local_storage=tmp_path)) as running:
        source = running.engine.sampler_source(None, TINY, None)
        params = dict(LONG_SAMPLE["sampling_params"])
        budgets = [Budget(1.0), Budget(1.0)]
        for budget in budgets:
            budget.start()
        results = running.engine.sample_batch(source, [
            SampleRequest([1, 42, 77], 16, params, budget=budgets[0]),
            SampleRequest([1, 42, 77], 1, {**params, "max_tokens": 3}, budget=budgets[1])])
    assert isinstance(results[0], JobInterrupted) and "DPO_LOCAL_REQUEST_TIMEOUT_S" in str(results[0])
    assert isinstance(results[1], dict) and [len(s["tokens"]) for s in results[1]["sequences"]] == [3]


def test_cancel_future_stops_a_running_sample(tmp_path, registered):
    from dpo_core.local.launcher import local_server

    with local_server(Settings(cache_dir=registered, local_storage=tmp_path)) as running, httpx.Client(
            base_url=f"{running.base_url}/api/v1", headers={"X-API-Key": running.api_key}, timeout=30) as http:
        running_id = http.post("/asample", json=LONG_SAMPLE).json()["request_id"]
        queued_id = http.post("/asample", json={**LONG_SAMPLE, "base_model": TINY, "num_samples": 1,
                                                "sampling_params": {"max_tokens": 1500, "top_k": 5}}).json()[
            "request_id"]
        time.sleep(0.5)
        started = time.monotonic()
        assert http.post("/cancel_future", json={"request_id": queued_id}).json() == {"cancelled": True}
        assert http.post("/cancel_future", json={"request_id": running_id}).json() == {"cancelled": True}
        for request_id in (running_id, queued_id):
            answer = _poll(http, request_id).json()
            assert answer["category"] == "user" and "cancelled" in answer["error"]
        assert time.monotonic() - started < 3
        assert http.get("/healthz").json() == {"status": "ok"}


@pytest.mark.slow
def test_sigterm_stops_a_busy_server_within_5_seconds(tmp_path, registered):
    env = {**os.environ, "DPO_CACHE_DIR": str(registered), "DPO_LOCAL_STORAGE": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "dpo_core.local", "serve", "--port", "0"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = key = None
        while key is None:
            line = process.stdout.readline()
            assert line, process.stderr.read()
            if "TINKER_BASE_URL=" in line:
                url = line.split("=", 1)[1].strip()
            if "TINKER_API_KEY=" in line:
                key = line.split("=", 1)[1].strip()
        with httpx.Client(base_url=f"{url}/api/v1", headers={"X-API-Key": key}, timeout=30) as http:
            request_id = http.post("/asample", json={**LONG_SAMPLE, "num_samples": 64}).json()["request_id"]
            time.sleep(1.0)  # decoding now
            poller = threading.Thread(target=lambda: _try_poll(http, request_id), daemon=True)
            poller.start()  # an open long-poll must not hold the shutdown either
            time.sleep(0.2)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
            took = time.monotonic() - started
        stderr = process.stderr.read()
        assert took < 5, f"shutdown took {took:.1f} s"
        assert process.returncode == 0 and "terminate called" not in stderr, stderr[-2000:]
    finally:
        if process.poll() is None:
            process.kill()


def _try_poll(http: httpx.Client, request_id: str) -> None:
    try:
        http.post("/retrieve_future", json={"request_id": request_id})
    except httpx.HTTPError:
        pass
