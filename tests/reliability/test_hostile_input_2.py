"""Issue 26: the second round of hostile input against the local server (raw HTTP and the real SDK).

Each repro of the issue (but the long stop strings, the decode loop's) is a test here: an absurd learning rate,
poisoned weights at sampling time, snapshot samplers piling up, invented session ids, heartbeats squatting the
session cap, large bodies stalling the event loop, deep nesting and huge integers. After each, `/healthz`
answers and a valid sample still works.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from tinker.proto import tinker_public_pb2 as pb

from dpo_core.settings import Settings
from tests.reliability.test_hostile_input import (PROMPT, TINY, assert_refused, fwd_bwd_body, logprobs_of, new_model,
                                                  result, sample_tokens)

MAX_SESSIONS = 8


@pytest.fixture(scope="module")
def hostile2(tmp_path_factory, registered):
    """Default body limits (what is documented is what is tested); a small session cap, so it is reachable."""
    from dpo_core.local.launcher import local_server

    settings = Settings(cache_dir=registered, local_storage=tmp_path_factory.mktemp("hostile2-storage"),
                        local_request_timeout_s=120.0, local_max_sessions=MAX_SESSIONS)
    with local_server(settings) as running:
        yield running


@pytest.fixture
def http(hostile2):
    with httpx.Client(base_url=f"{hostile2.base_url}/api/v1", headers={"X-API-Key": hostile2.api_key},
                      timeout=120) as client:
        yield client


def still_serving(http: httpx.Client, before: list[list[int]] | None = None) -> None:
    """`/healthz` answers ok and a valid seeded sample works (and gives the same tokens as before)."""
    assert http.get("/healthz").json() == {"status": "ok"}
    tokens = sample_tokens(http)
    assert len(tokens) == 2 and all(len(t) == 6 for t in tokens)
    if before is not None:
        assert tokens == before


def new_session(http: httpx.Client) -> str:
    reply = http.post("/create_session", json={"tags": [], "sdk_version": "test"})
    assert reply.status_code == 200, reply.text
    return reply.json()["session_id"]


def finish(http: httpx.Client, model_id: str) -> None:
    http.post(f"/sessions/{model_id.split(':train:')[0]}/finish")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


# ---------------------------------------------------------------------------------------------- 1. absurd steps
def test_an_absurd_learning_rate_is_refused_naming_the_field(http):
    before = sample_tokens(http)
    model_id = new_model(http, seq=1)
    trained_before = logprobs_of(http, model_id)
    result(http, http.post("/forward_backward", content=fwd_bwd_body(model_id, [1.0] * 4, False),
                           headers={"content-type": "application/x-protobuf"}))
    reply = http.post("/optim_step", json={"model_id": model_id, "adam_params": {"learning_rate": 1e30}})
    assert_refused(reply, 422, "adam_params.learning_rate")
    assert "less than or equal to 1" in reply.json()["error"]
    assert logprobs_of(http, model_id) == trained_before
    finish(http, model_id)
    still_serving(http, before)


def test_a_step_that_makes_the_forward_non_finite_is_rolled_back(http):
    """A finite step whose weights stay finite but overflow every forward (learning rate 1, weight decay 1e30
    scales each LoRA weight by -1e30): refused with the cause, the model as it was, checkpoints still finite."""
    before = sample_tokens(http)
    model_id = new_model(http, seq=2)
    trained_before = logprobs_of(http, model_id)
    result(http, http.post("/forward_backward", content=fwd_bwd_body(model_id, [1.0] * 4, False),
                           headers={"content-type": "application/x-protobuf"}))
    step = result(http, http.post("/optim_step", json={
        "model_id": model_id, "adam_params": {"learning_rate": 1.0, "weight_decay": 1e30}}))
    body = step.json()
    assert body["category"] == "user" and "forward NaN/inf" in body["error"] and "rolled back" in body["error"], body
    after = logprobs_of(http, model_id)
    assert after == trained_before and np.isfinite(after).all()
    saved = result(http, http.post("/save_weights", json={"model_id": model_id, "path": "after-rollback"}))
    assert saved.json()["path"].endswith("/weights/after-rollback"), saved.text
    # The same gradients with a sane rate still train: the refusal left the model usable.
    good = result(http, http.post("/optim_step", json={"model_id": model_id, "adam_params": {"learning_rate": 1e-2}}))
    assert "metrics" in good.json(), good.text
    assert logprobs_of(http, model_id) != trained_before
    finish(http, model_id)
    still_serving(http, before)


def _plant_broken_checkpoint(server, http: httpx.Client) -> str:
    """A sampler checkpoint with finite but huge LoRA weights, as one written elsewhere might be: every forward
    through it overflows. Written straight into the server's storage (its own writes refuse such weights)."""
    model_id = new_model(http, seq=3)
    state = server.engine.trainer.models[model_id].adapter_state()
    huge = {key: torch.full_like(value, 1e15) for key, value in state.items()}
    path = server.engine.checkpoints.write(model_id, "sampler_weights", "broken", adapter_state=huge,
                                           meta={"base_model": TINY, "lora": {"rank": 2}, "steps": 1},
                                           optimizer_state=None, overwrite=True)
    finish(http, model_id)
    return path


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_broken_weights_is_an_error_never_nan(http, hostile2, temperature):
    before = sample_tokens(http)
    path = _plant_broken_checkpoint(hostile2, http)
    body = {"model_path": path, "num_samples": 2, "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
            "sampling_params": {"max_tokens": 4, "temperature": temperature, "seed": 3, "stop": []},
            "prompt_logprobs": True}
    answer = result(http, http.post("/asample", json=body))
    assert answer.headers["content-type"].startswith("application/json"), "a result came back from NaN logits"
    error = answer.json()
    assert error["category"] == "user" and "NaN/inf" in error["error"] and path in error["error"], error
    still_serving(http, before)


def test_sdk_sees_the_refused_step_at_once(hostile2):
    import tinker
    from tinker import types

    with tinker.ServiceClient(base_url=hostile2.base_url, api_key=hostile2.api_key) as service:
        training = service.create_lora_training_client(base_model=TINY, rank=2, seed=5)
        datum = types.Datum(model_input=types.ModelInput.from_ints(PROMPT),
                            loss_fn_inputs={"target_tokens": PROMPT[1:] + [5], "weights": [1.0] * 4})
        training.forward_backward([datum], "cross_entropy").result()
        started = time.monotonic()
        with pytest.raises(Exception, match="learning_rate"):
            training.optim_step(types.AdamParams(learning_rate=1e30)).result()
        assert time.monotonic() - started < 15  # refused, not retried
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()


# ---------------------------------------------------------------------------------------------- 3. snapshots
def test_snapshot_samplers_are_bounded_and_memory_stays_flat(hostile2):
    """500 `save_weights_and_get_sampling_client()` calls on a rank-256 model (a ~2 MB adapter each): the
    session keeps its 8 most recently used snapshots, the server's memory does not grow with the calls, the
    newest sampler samples and an evicted one is a clear error."""
    import gc

    import tinker
    from tinker import types

    calls, cap = 500, hostile2.engine.sampler.max_snapshots_per_session
    with tinker.ServiceClient(base_url=hostile2.base_url, api_key=hostile2.api_key) as service:
        training = service.create_lora_training_client(base_model=TINY, rank=256, seed=1).result()
        session_id = training.model_id.split(":train:")[0]
        snapshot_bytes = sum(t.numel() * t.element_size()
                             for t in hostile2.engine.trainer.models[training.model_id].adapter_state().values())
        first = training.save_weights_and_get_sampling_client()
        baseline = None
        for call in range(1, calls):
            newest = training.save_weights_and_get_sampling_client()
            if call == 20:  # past the cap and the first allocations: what the rest must not grow from
                gc.collect()
                baseline = rss_bytes()
            if call % 50 == 0:
                held = [s for s in hostile2.engine.sampler.sessions if s.startswith(f"{session_id}:")]
                assert len(held) <= cap, f"{len(held)} snapshot samplers held after {call} calls"
        gc.collect()
        growth = rss_bytes() - baseline
        # Unbounded, the 480 calls after the baseline would hold 480 adapters; allow a tenth of that for noise.
        assert growth < 0.1 * (calls - 20) * snapshot_bytes, (growth, snapshot_bytes)
        prompt = types.ModelInput.from_ints(PROMPT)
        params = types.SamplingParams(max_tokens=3, seed=1, temperature=0.0)
        assert len(newest.sample(prompt, 1, params).result().sequences[0].tokens) == 3
        with pytest.raises(Exception, match="was released.*DPO_LOCAL_MAX_SNAPSHOTS_PER_SESSION"):
            first.sample(prompt, 1, params).result()
    # The session's end releases the rest. The server answers the SDK's finish at once and queues the release
    # behind the session's own work on the engine thread, so the release lands shortly after close() returns.
    deadline = time.monotonic() + 60
    while hostile2.engine.sampler.snapshot_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hostile2.engine.sampler.snapshot_count() == 0


def test_the_global_snapshot_cap_evicts_across_sessions(tmp_path, registered):
    from dpo_core.local.launcher import local_server

    settings = Settings(cache_dir=registered, local_storage=tmp_path, local_max_snapshots=3,
                        local_max_snapshots_per_session=2)
    with local_server(settings) as running, httpx.Client(
            base_url=f"{running.base_url}/api/v1", headers={"X-API-Key": running.api_key}, timeout=60) as http:
        models = [new_model(http, seq=i) for i in range(3)]
        for index, model_id in enumerate(models):
            for seq in range(2):
                reply = result(http, http.post("/save_weights_for_sampler", json={
                    "model_id": model_id, "sampling_session_seq_id": 10 * index + seq}))
                assert "sampling_session_id" in reply.json(), reply.text
        assert running.engine.sampler.snapshot_count() == 3
        assert [running.engine.sampler.snapshot_count(m.split(":train:")[0]) for m in models] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- 4, 5. session ids
INVENTED = "invented-session"


@pytest.mark.parametrize("route, body", [
    ("/create_model", {"session_id": INVENTED, "model_seq_id": 0, "base_model": TINY, "lora_config": {"rank": 2}}),
    ("/create_sampling_session", {"session_id": INVENTED, "sampling_session_seq_id": 0, "base_model": TINY}),
    ("/load_weights", {"session_id": INVENTED, "model_seq_id": 0, "path": "tinker://x:train:0/weights/final"}),
    ("/session_heartbeat", {"session_id": INVENTED}),
])
def test_session_routes_take_only_issued_session_ids(http, hostile2, route, body):
    before = sample_tokens(http)
    models, samplers = len(hostile2.engine.trainer.models), len(hostile2.engine.sampler.sessions)
    reply = http.post(route, json=body)
    assert reply.status_code == 410, reply.text
    assert reply.json()["category"] == "user" and "not live on this server" in reply.json()["error"]
    assert (len(hostile2.engine.trainer.models), len(hostile2.engine.sampler.sessions)) == (models, samplers)
    still_serving(http, before)


def test_heartbeats_of_invented_ids_cannot_fill_the_session_cap(http):
    before = sample_tokens(http)
    for index in range(MAX_SESSIONS + 10):
        assert http.post("/session_heartbeat", json={"session_id": f"squatter-{index}"}).status_code == 410
    session = new_session(http)  # the cap still has room for real clients
    assert http.post("/session_heartbeat", json={"session_id": session}).json() == {"type": "session_heartbeat"}
    http.post(f"/sessions/{session}/finish")
    still_serving(http, before)


def test_a_finished_session_is_gone_for_its_routes(http):
    session = new_session(http)
    http.post(f"/sessions/{session}/finish")
    reply = http.post("/create_model", json={"session_id": session, "model_seq_id": 0, "base_model": TINY})
    assert reply.status_code == 410 and "finished" in reply.json()["error"]


# ---------------------------------------------------------------------------------------------- 6. large bodies
class HealthWatch:
    """Polls `/healthz` from its own connection while something else runs; records the slowest answer."""

    def __init__(self, server):
        self.server, self.slowest, self.answers, self.peak_rss = server, 0.0, 0, rss_bytes()
        self._stop = threading.Event()
        self.log = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=f"{self.server.base_url}/api/v1", headers={"X-API-Key": self.server.api_key},
                          timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                assert client.get("/healthz").json() == {"status": "ok"}
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.log.append((round(started % 1000, 2), round(time.monotonic() - started, 3)))
                self.answers += 1
                self.peak_rss = max(self.peak_rss, rss_bytes())
                time.sleep(0.05)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


def _empty_datums_body(size: int) -> bytes:
    """A protobuf ForwardBackwardRequest of `size` bytes that is nothing but empty datums (2 bytes each): it
    used to decode into size/2 messages in one GIL-holding call (64 MB: 1.8 GB and 12 s)."""
    field = pb.ForwardBackwardRequest.DESCRIPTOR.fields_by_name["data"].number
    return bytes([(field << 3) | 2, 0]) * (size // 2)


def _send_protobuf(server, body: bytes) -> httpx.Response:
    with httpx.Client(base_url=f"{server.base_url}/api/v1", headers={"X-API-Key": server.api_key},
                      timeout=120) as client:
        return client.post("/forward_backward", content=body, headers={"content-type": "application/x-protobuf"})


def watched(server, send, attempts: int = 2) -> tuple[httpx.Response, HealthWatch]:
    """`send()` while /healthz is polled; a second try if the first saw an answer slower than 1 s.

    The bound is the issue's, on a 2-vCPU machine shared with other test runs: one descheduling of this process
    can exceed it on its own, once. The code it guards stalled every time (12 s for one protobuf body)."""
    for _ in range(attempts):
        with HealthWatch(server) as watch:
            reply = send()
            time.sleep(0.2)
        if watch.slowest < 1.0:
            break
    return reply, watch


def test_a_maximal_protobuf_body_never_stalls_the_server(http, hostile2):
    """A body at the protobuf cap that decodes into the most messages: refused, /healthz within 1 s throughout."""
    before = sample_tokens(http)
    body = _empty_datums_body(hostile2.app.state.limits.max_body_bytes)
    reply, watch = watched(hostile2, lambda: _send_protobuf(hostile2, body))
    assert_refused(reply, 422, "protobuf messages")
    assert watch.answers >= 3 and watch.slowest < 1.0, sorted(watch.log, key=lambda x: -x[1])[:5]
    still_serving(http, before)


def test_concurrent_maximal_protobuf_bodies_are_bounded(http, hostile2):
    """Three at once: all refused, at most two read and decoded at a time (the large-body gate), so the memory
    they take stays a small multiple of the cap; /healthz keeps answering."""
    before = sample_tokens(http)
    cap = hostile2.app.state.limits.max_body_bytes
    body = _empty_datums_body(cap)
    start_rss = rss_bytes()
    with HealthWatch(hostile2) as watch, concurrent.futures.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: _send_protobuf(hostile2, body), range(3)))
    for reply in replies:
        assert_refused(reply, 422, "protobuf messages")
    assert watch.answers >= 3
    # This process holds the sent body once; the server up to 2 bodies being read, their joined copies and the
    # scan's state. Before the gate and the scan, each such body decoded into 1.8 GB of messages.
    assert watch.peak_rss - start_rss < 6 * cap, watch.peak_rss - start_rss
    still_serving(http, before)


def test_a_maximal_json_body_is_decoded_without_stalling_the_server(http, hostile2):
    before = sample_tokens(http)
    cap = hostile2.app.state.limits.max_json_body_bytes
    tokens = [7] * ((cap - 200) // 2)  # "7," per token: as many as fit in the JSON cap
    body = json.dumps({"base_model": TINY, "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
                       "sampling_params": {"max_tokens": 1}}, separators=(",", ":")).encode()
    assert cap - 1024 < len(body) <= cap
    reply, watch = watched(hostile2, lambda: http.post("/asample", content=body,
                                                       headers={"content-type": "application/json"}))
    assert_refused(reply, 422, "prompt")  # past the model's context: decoded, then refused
    assert watch.slowest < 1.0, sorted(watch.log, key=lambda x: -x[1])[:5]
    still_serving(http, before)


def test_a_json_body_over_its_cap_is_refused_before_decoding(http, hostile2):
    before = sample_tokens(http)
    body = b'{"tags": [' + b'"t",' * (3 << 20) + b'"t"]}'  # 12 MiB: over the JSON cap, under the protobuf one
    reply = http.post("/create_session", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "DPO_LOCAL_MAX_JSON_BODY_BYTES" in reply.json()["error"], reply.text
    still_serving(http, before)


# ---------------------------------------------------------------------------------------------- 7. nesting, integers
def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


HUGE = "9" * 5000
SAMPLE_JSON = ('{"base_model": "local/tiny", "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 42]}]}, '
               '"sampling_params": %s}')
DEEP_AND_HUGE = {
    "deep_user_metadata": ("/create_session", '{"tags": [], "user_metadata": %s}' % _nested(2000), "user_metadata"),
    "deep_tags": ("/create_session", '{"tags": %s}' % ("[" * 2000 + "]" * 2000), "tags"),
    "deep_stop": ("/asample", SAMPLE_JSON % ('{"stop": %s}' % ("[" * 2000 + "]" * 2000)), "sampling_params"),
    "deep_adam_params": ("/optim_step", '{"model_id": "m", "adam_params": %s}' % _nested(100), "adam_params"),
    "deep_body": ("/retrieve_future", "[" * 5000 + "]" * 5000, "body"),
    "huge_seed": ("/asample", SAMPLE_JSON % ('{"seed": %s}' % HUGE), "sampling_params.seed"),
    "huge_metadata_value": ("/create_session", '{"tags": [], "user_metadata": {"n": %s}}' % HUGE, "user_metadata.n"),
    "huge_seq_id": ("/optim_step", '{"model_id": "m", "seq_id": -%s, "adam_params": {}}' % HUGE, "seq_id"),
    "huge_token": ("/asample", SAMPLE_JSON.replace("[1, 42]", "[1, %s]" % HUGE) % "{}", "prompt.chunks.0.tokens.1"),
    "huge_request_id": ("/retrieve_future", '{"request_id": %s}' % HUGE, "request_id"),
    "huge_body": ("/create_session", HUGE, "body"),
}


@pytest.mark.parametrize("case", sorted(DEEP_AND_HUGE))
def test_deep_nesting_and_huge_integers_are_refused_naming_the_field(http, case):
    before = sample_tokens(http)
    route, body, field = DEEP_AND_HUGE[case]
    reply = http.post(route, content=body.encode(), headers={"content-type": "application/json"})
    assert_refused(reply, 422, field)
    assert reply.json()["field"] == field
    still_serving(http, before)


JSON_ROUTES = ["/create_session", "/session_heartbeat", "/create_model", "/get_info", "/optim_step", "/save_weights",
               "/save_weights_for_sampler", "/load_weights", "/unload_model", "/weights_info",
               "/create_sampling_session", "/asample", "/retrieve_future", "/cancel_future"]
HOSTILE_BODIES = ["[" * 3000, "[" * 3000 + "]" * 3000, HUGE, "-" + HUGE + ".5e99999", '{"x": %s}' % HUGE,
                  _nested(1500), "1e99999", '"' + "\\" * 4001 + '"', "null", '{"": {"": [[[[[[[[[[]]]]]]]]]]}}',
                  '{"session_id": {"a": [%s]}}' % HUGE, '{"model_id": "m", "adam_params": {"learning_rate": 1e400}}']


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_no_hostile_body_answers_500(http, route):
    for body in HOSTILE_BODIES:
        reply = http.post(route, content=body.encode(), headers={"content-type": "application/json"})
        assert reply.status_code < 500, (route, body[:40], reply.status_code, reply.text[:200])
        assert reply.status_code == 200 or reply.json()["category"] == "user"
    still_serving(http)
