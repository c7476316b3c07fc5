"""Issue 14: hostile and broken input against the local server, through raw HTTP and the real SDK.

Every case asserts the status, that the message names the field (or the limit), and that a valid request
afterwards, on the same kept-alive connection, still succeeds with unchanged results.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import zstandard
from tinker.proto import tinker_public_pb2 as pb

from dpo_core.settings import Settings

TINY = "local/tiny"
PROMPT = [1, 42, 77, 300]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, registered):
    """A server with small limits, so that every cap is reachable in a fast test. The time budget is not one of
    them (tests/reliability/test_engine_bounds.py has its own): 120 s, so that the busy samples below finish on a
    loaded machine."""
    from dpo_core.local.launcher import local_server

    settings = Settings(cache_dir=registered, local_storage=tmp_path_factory.mktemp("hostile-storage"),
                        local_max_body_bytes=1 << 20, local_request_timeout_s=120.0, local_max_training_models=4)
    with local_server(settings) as running:
        yield running


@pytest.fixture
def http(hostile):
    with httpx.Client(base_url=f"{hostile.base_url}/api/v1", headers={"X-API-Key": hostile.api_key},
                      timeout=60) as client:
        yield client


def result(http: httpx.Client, reply: httpx.Response) -> httpx.Response:
    """Poll a future until it answers."""
    assert reply.status_code == 200, reply.text
    while True:
        answer = http.post("/retrieve_future", json={"request_id": reply.json()["request_id"]})
        if answer.headers["content-type"].startswith("application/json") and answer.json().get("type") == "try_again":
            continue
        return answer


def sample_tokens(http: httpx.Client, **extra) -> list[list[int]]:
    body = {"base_model": TINY, "num_samples": 2, "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
            "sampling_params": {"max_tokens": 6, "temperature": 1.0, "seed": 11, "stop": []}, **extra}
    answer = result(http, http.post("/asample", json=body))
    assert answer.headers["content-type"] == "application/x-protobuf", answer.text
    response = pb.SampleResponse()
    response.ParseFromString(answer.content)
    return [np.frombuffer(s.tokens, dtype=np.int32).tolist() for s in response.sequences]


def _sample_body(num_samples: int, max_tokens: int) -> dict:
    return {"base_model": TINY, "num_samples": num_samples, "prompt": {"chunks": [{"tokens": PROMPT}]},
            "sampling_params": {"max_tokens": max_tokens, "seed": 1, "stop": []}}


def new_model(http: httpx.Client, seq: int | None = None) -> str:
    session = http.post("/create_session", json={"tags": [], "sdk_version": "test"}).json()["session_id"]
    reply = http.post("/create_model", json={"session_id": session, "model_seq_id": seq or 0, "base_model": TINY,
                                             "lora_config": {"rank": 2, "seed": 3}})
    answer = result(http, reply)
    assert "model_id" in answer.json(), answer.text
    return answer.json()["model_id"]


def fwd_bwd_body(model_id: str, weights: list[float], forward_only: bool, seq_id: int = 0) -> bytes:
    request = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, forward_only=forward_only,
                                        loss_fn="cross_entropy")
    datum = request.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray(PROMPT, dtype=np.int32).tobytes()
    datum.loss_fn_inputs["target_tokens"].dtype = pb.DTYPE_INT64
    datum.loss_fn_inputs["target_tokens"].dense = np.asarray(PROMPT[1:] + [5], dtype=np.int64).tobytes()
    datum.loss_fn_inputs["weights"].dtype = pb.DTYPE_FLOAT32
    datum.loss_fn_inputs["weights"].dense = np.asarray(weights, dtype=np.float32).tobytes()
    return request.SerializeToString()


def logprobs_of(http: httpx.Client, model_id: str) -> list[float]:
    """The model's logprobs of a fixed datum (forward only): equal before and after means unchanged weights."""
    answer = result(http, http.post("/forward_backward", content=fwd_bwd_body(model_id, [1.0] * 4, True),
                                    headers={"content-type": "application/x-protobuf"}))
    output = pb.ForwardBackwardOutput()
    output.ParseFromString(answer.content)
    return np.frombuffer(output.loss_fn_outputs[0].fields["logprobs"].data, dtype=np.float32).tolist()


def assert_refused(reply: httpx.Response, status: int, field: str) -> None:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body["category"] == "user" and field in body["error"], body
    assert "Traceback" not in body["error"] and "IndexError" not in body["error"]


# ---------------------------------------------------------------------------------------------- edge validation
SAMPLE = {"base_model": TINY, "num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
          "sampling_params": {"max_tokens": 4}}


def _sample(**changes):
    body = {**SAMPLE, "sampling_params": dict(SAMPLE["sampling_params"])}
    for key, value in changes.items():
        if key in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop"):
            body["sampling_params"][key] = value
        else:
            body[key] = value
    return body


def _tokens(tokens):
    return {"chunks": [{"type": "encoded_text", "tokens": tokens}]}


BAD_JSON_REQUESTS = {
    "negative_token": ("/asample", _sample(prompt=_tokens([1, -5])), "prompt.chunks.0.tokens.1"),
    "empty_prompt": ("/asample", _sample(prompt=_tokens([])), "prompt"),
    "huge_topk": ("/asample", _sample(topk_prompt_logprobs=10**9), "topk_prompt_logprobs"),
    "negative_max_tokens": ("/asample", _sample(max_tokens=-1), "sampling_params.max_tokens"),
    "max_tokens_past_context": ("/asample", _sample(max_tokens=10**9), "sampling_params.max_tokens"),
    "prompt_past_context": ("/asample", _sample(prompt=_tokens([5] * 3000)), "prompt"),
    "negative_temperature": ("/asample", _sample(temperature=-0.5), "sampling_params.temperature"),
    "top_p_zero": ("/asample", _sample(top_p=0.0), "sampling_params.top_p"),
    "top_p_above_one": ("/asample", _sample(top_p=1.5), "sampling_params.top_p"),
    "top_k_below_minus_one": ("/asample", _sample(top_k=-2), "sampling_params.top_k"),
    "too_many_samples": ("/asample", _sample(num_samples=10**6), "num_samples"),
    "string_num_samples": ("/asample", _sample(num_samples="2"), "num_samples"),
    "missing_prompt": ("/asample", {"base_model": TINY, "sampling_params": {}}, "prompt"),
    "fractional_rank": ("/create_model", {"session_id": "s", "model_seq_id": 0, "base_model": TINY,
                                          "lora_config": {"rank": 2.5}}, "lora_config.rank"),
    "huge_rank": ("/create_model", {"session_id": "s", "model_seq_id": 0, "base_model": TINY,
                                    "lora_config": {"rank": 10**6}}, "lora_config.rank"),
    "missing_base_model": ("/create_model", {"session_id": "s", "model_seq_id": 0}, "base_model"),
    "string_seq_id": ("/optim_step", {"model_id": "s:train:0", "seq_id": "first", "adam_params": {}}, "seq_id"),
    "nan_learning_rate": ("/optim_step", b'{"model_id": "m", "adam_params": {"learning_rate": NaN}}',
                          "adam_params.learning_rate"),
    "negative_learning_rate": ("/optim_step", {"model_id": "m", "adam_params": {"learning_rate": -1e-3}},
                               "adam_params.learning_rate"),
    "beta1_one": ("/optim_step", {"model_id": "m", "adam_params": {"beta1": 1.0}}, "adam_params.beta1"),
    "name_with_newline": ("/save_weights", {"model_id": "m", "path": "final\n"}, "path"),
    "name_with_slash": ("/save_weights_for_sampler", {"model_id": "m", "path": "../x"}, "path"),
    "too_many_tags": ("/create_session", {"tags": ["t"] * 1000, "sdk_version": "x"}, "tags"),
    "long_tag": ("/create_session", {"tags": ["t" * 10_000], "sdk_version": "x"}, "tags.0"),
    "wrong_type_future": ("/retrieve_future", {"request_id": 7}, "request_id"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON_REQUESTS))
def test_bad_json_request_is_refused_naming_the_field(case, http):
    before = sample_tokens(http)
    route, body, field = BAD_JSON_REQUESTS[case]
    sent = http.post(route, content=body) if isinstance(body, bytes) else http.post(route, json=body)
    assert_refused(sent, 422, field)
    assert sample_tokens(http) == before  # same connection, same seeded tokens: nothing was disturbed


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json_is_400_and_keeps_the_connection(raw, http):
    before = sample_tokens(http)
    assert_refused(http.post("/create_session", content=raw, headers={"content-type": "application/json"}),
                   400, "body")
    assert sample_tokens(http) == before


def test_non_integer_seq_id_cannot_stop_the_engine(http, hostile):
    """The request that used to kill the engine thread (TypeError while ordering jobs) while /healthz said ok."""
    model_id = new_model(http, seq=1)
    busy = _sample_body(num_samples=16, max_tokens=200)  # holds the engine, so the steps below queue up together
    busy_reply = http.post("/asample", json=busy)
    queued = http.post("/optim_step", json={"model_id": model_id, "seq_id": 2, "adam_params": {}})
    for seq_id in ("x", 1.5, [1]):
        assert_refused(http.post("/optim_step", json={"model_id": model_id, "seq_id": seq_id, "adam_params": {}}),
                       422, "seq_id")
    assert "metrics" in result(http, queued).json()
    assert result(http, busy_reply).status_code == 200
    assert http.get("/healthz").json() == {"status": "ok"}
    step = result(http, http.post("/optim_step", json={"model_id": model_id, "seq_id": 3, "adam_params": {}}))
    assert "metrics" in step.json(), step.text
    http.post("/unload_model", json={"model_id": model_id})


# ---------------------------------------------------------------------------------------------- non-finite values
def test_nan_weights_are_refused_and_the_model_is_unchanged(http):
    model_id = new_model(http, seq=2)
    before = logprobs_of(http, model_id)
    reply = http.post("/forward_backward", content=fwd_bwd_body(model_id, [1.0, float("nan"), 1.0, 1.0], False),
                      headers={"content-type": "application/x-protobuf"})
    assert_refused(reply, 422, "data[0].loss_fn_inputs.weights")
    result(http, http.post("/optim_step", json={"model_id": model_id, "adam_params": {"learning_rate": 0.1}}))
    assert logprobs_of(http, model_id) == before  # no gradient reached the weights
    http.post("/unload_model", json={"model_id": model_id})


def test_overflowing_gradients_are_refused_by_optim_step(http, hostile):
    """Finite inputs whose gradient norm overflows: the step is refused, the model left as it was."""
    model_id = new_model(http, seq=3)
    before = logprobs_of(http, model_id)
    reply = result(http, http.post("/forward_backward", content=fwd_bwd_body(model_id, [1e36] * 4, False),
                                   headers={"content-type": "application/x-protobuf"}))
    assert reply.status_code == 200
    step = result(http, http.post("/optim_step", json={"model_id": model_id, "adam_params": {"learning_rate": 0.1}}))
    assert step.json()["category"] == "user" and "not finite" in step.json()["error"], step.text
    assert logprobs_of(http, model_id) == before
    save = result(http, http.post("/save_weights", json={"model_id": model_id, "path": "after-refusal"}))
    assert save.json()["path"].endswith("/weights/after-refusal")  # the checkpoint written is a finite one
    http.post("/unload_model", json={"model_id": model_id})


def test_sdk_sees_a_clear_error_for_nan_weights(hostile):
    import tinker
    from tinker import types

    with tinker.ServiceClient(base_url=hostile.base_url, api_key=hostile.api_key) as service:
        training = service.create_lora_training_client(base_model=TINY, rank=2, seed=5)
        datum = types.Datum(model_input=types.ModelInput.from_ints(PROMPT),
                            loss_fn_inputs={"target_tokens": PROMPT[1:] + [5],
                                            "weights": [1.0, float("nan"), 1.0, 1.0]})
        with pytest.raises(Exception, match="weights"):
            training.forward_backward([datum], "cross_entropy").result()
        good = types.Datum(model_input=types.ModelInput.from_ints(PROMPT),
                           loss_fn_inputs={"target_tokens": PROMPT[1:] + [5], "weights": [1.0] * 4})
        first = training.forward([good], "cross_entropy").result()
        again = training.forward([good], "cross_entropy").result()
        assert first.loss_fn_outputs[0]["logprobs"].tolist() == again.loss_fn_outputs[0]["logprobs"].tolist()


# ---------------------------------------------------------------------------------------------- models and sessions
def test_create_model_never_replaces_a_live_model(http):
    model_id = new_model(http, seq=4)
    result(http, http.post("/forward_backward", content=fwd_bwd_body(model_id, [1.0] * 4, False),
                           headers={"content-type": "application/x-protobuf"}))
    result(http, http.post("/optim_step", json={"model_id": model_id, "adam_params": {"learning_rate": 0.05}}))
    trained = logprobs_of(http, model_id)
    session = model_id.split(":train:")[0]
    again = result(http, http.post("/create_model", json={"session_id": session, "model_seq_id": 4,
                                                          "base_model": TINY, "lora_config": {"rank": 2}}))
    assert again.json()["category"] == "user" and "already exists" in again.json()["error"]
    assert logprobs_of(http, model_id) == trained
    http.post("/unload_model", json={"model_id": model_id})


def test_live_training_models_are_capped(http, hostile):
    cap = 4
    made = [new_model(http, seq=100 + i) for i in range(cap - len(hostile.engine.trainer.models))]
    session = http.post("/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
    over = result(http, http.post("/create_model", json={"session_id": session, "model_seq_id": 0,
                                                         "base_model": TINY, "lora_config": {"rank": 2}}))
    assert over.json()["category"] == "user" and "DPO_LOCAL_MAX_TRAINING_MODELS" in over.json()["error"]
    for model_id in made:
        result(http, http.post("/unload_model", json={"model_id": model_id}))
    assert "model_id" in new_model_json(http, session)


def new_model_json(http, session):
    return result(http, http.post("/create_model", json={"session_id": session, "model_seq_id": 1,
                                                         "base_model": TINY, "lora_config": {"rank": 2}})).json()


def test_idle_sessions_expire(tmp_path, registered):
    from dpo_core.local.launcher import local_server

    settings = Settings(cache_dir=registered, local_storage=tmp_path, local_session_idle_s=1.0)
    with local_server(settings) as running, httpx.Client(
            base_url=f"{running.base_url}/api/v1", headers={"X-API-Key": running.api_key}, timeout=60) as http:
        abandoned = new_model(http)
        kept = new_model(http)
        deadline = time.monotonic() + 10
        while abandoned in running.engine.trainer.models and time.monotonic() < deadline:
            http.post("/session_heartbeat", json={"session_id": kept.split(":train:")[0]})
            http.get("/healthz")
            sample_tokens(http)  # any queued request runs the sweep
            time.sleep(0.3)
        assert abandoned not in running.engine.trainer.models
        assert kept in running.engine.trainer.models  # its heartbeat kept it


# ---------------------------------------------------------------------------------------------- body cap
def test_chunked_body_over_the_cap_is_refused(http, hostile):
    def chunks():
        for _ in range(64):
            yield b" " * 65536  # 4 MiB in all, no Content-Length

    reply = http.post("/create_session", content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "DPO_LOCAL_MAX_BODY_BYTES" in reply.json()["error"]
    assert http.get("/healthz").json() == {"status": "ok"}


def test_zstd_bomb_is_refused_while_decompressing(http):
    before = sample_tokens(http)
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    assert len(bomb) < 1 << 20  # small on the wire, 64x the cap once inflated
    reply = http.post("/forward_backward", content=bomb,
                      headers={"content-type": "application/x-protobuf", "content-encoding": "zstd"})
    assert reply.status_code == 413 and "decompressed" in reply.json()["error"]
    assert sample_tokens(http) == before


def test_compressed_body_within_the_cap_still_works(http):
    model_id = new_model(http, seq=5)
    plain = logprobs_of(http, model_id)
    body = zstandard.ZstdCompressor().compress(fwd_bwd_body(model_id, [1.0] * 4, True))
    answer = result(http, http.post("/forward_backward", content=body, headers={
        "content-type": "application/x-protobuf", "content-encoding": "zstd"}))
    output = pb.ForwardBackwardOutput()
    output.ParseFromString(answer.content)
    assert np.frombuffer(output.loss_fn_outputs[0].fields["logprobs"].data, dtype=np.float32).tolist() == plain
    http.post("/unload_model", json={"model_id": model_id})
