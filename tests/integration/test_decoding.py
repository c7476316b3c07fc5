"""Issue 27: vectorised continuous decoding keeps each sample's tokens a function of its request alone.

A sample's tokens depend on its prompt, parameters, seed and index, never on its batch-mates, on when it joined a
running batch, or on the cache layout; a request's samples share one prefill; non-finite logits fail only their
own request. Driven on the real engine (local/tiny), as the server's worker drives it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from dpo_core.local.engine import Engine
from dpo_core.local.sampler import SampleRequest
from dpo_core.local.validation import UserError

TINY = "local/tiny"


@pytest.fixture(scope="module")
def engine(tmp_path_factory, registered):
    return Engine(tmp_path_factory.mktemp("storage"), registered)


def _request(prompt, num_samples=3, **params):
    return SampleRequest(list(prompt), num_samples, {"max_tokens": 12, "temperature": 1.0, "seed": 5, "stop": [],
                                                     **params})


def _tokens(result):
    return [s["tokens"] for s in result["sequences"]]


def _logprobs(result):
    return np.concatenate([s["logprobs"] for s in result["sequences"]])


SHORT = [1, 42, 77, 9]
LONG = [1] + list(range(300, 340))


def test_same_seed_same_tokens_whatever_the_batch_mates(engine):
    source = engine.sampler_source(None, TINY, None)
    alone = engine.sample_batch(source, [_request(SHORT)])[0]
    mates = [_request(LONG, 4, seed=9), _request(SHORT, 2, seed=1, max_tokens=3),
             _request(LONG, 1, temperature=0.0, max_tokens=20)]
    together = engine.sample_batch(source, [mates[0], _request(SHORT), *mates[1:]])[1]
    assert _tokens(together) == _tokens(alone)
    # fp32 logits of one row through differently shaped batches: equal up to float rounding of the reductions
    np.testing.assert_allclose(_logprobs(together), _logprobs(alone), rtol=0, atol=1e-4)
    assert len({tuple(t) for t in _tokens(alone)}) > 1  # the samples differ from each other


def test_sample_i_uses_seed_plus_i(engine):
    source = engine.sampler_source(None, TINY, None)
    three = engine.sample_batch(source, [_request(SHORT, 3, seed=20)])[0]
    third = engine.sample_batch(source, [_request(SHORT, 1, seed=22)])[0]
    assert _tokens(three)[2] == _tokens(third)[0]


def test_a_request_that_joins_a_running_batch_gets_the_same_tokens_and_is_answered_first(engine):
    """Continuous batching: a request handed over while another decodes joins at the next step, is answered as
    soon as its own rows are done (before the long one), and samples exactly what it would alone."""
    source = engine.sampler_source(None, TINY, None)
    joining = _request(LONG, 2, seed=3, max_tokens=6)
    alone = engine.sample_batch(source, [_request(LONG, 2, seed=3, max_tokens=6)])[0]
    answered: list[tuple[int, object]] = []
    asked = {"steps": 0}

    def admit(live_rows):
        asked["steps"] += 1
        return [joining] if asked["steps"] == 5 else []

    engine.sample_stream(source, [_request(SHORT, 4, seed=1, max_tokens=60)],
                         lambda position, result: answered.append((position, result)), admit)
    assert [position for position, _ in answered] == [1, 0]  # the joiner finished first
    assert _tokens(answered[0][1]) == _tokens(alone)
    assert all(len(t) == 60 for t in _tokens(answered[1][1]))


def test_stop_ids_end_each_row_on_its_stop_token(engine):
    source = engine.sampler_source(None, TINY, None)
    free = engine.sample_batch(source, [_request(SHORT, 3, max_tokens=10)])[0]
    stop_token = _tokens(free)[1][4]
    stopped = engine.sample_batch(source, [_request(SHORT, 3, max_tokens=10, stop=[stop_token])])[0]
    for row, original in zip(stopped["sequences"], _tokens(free)):
        end = original.index(stop_token) + 1 if stop_token in original else len(original)
        assert row["tokens"] == original[:end]
        assert row["stop_reason"] == ("stop" if stop_token in original else "length")


def test_a_request_samples_share_one_prefill(engine):
    source = engine.sampler_source(None, TINY, None)
    before = engine.counters["prefill_tokens"]
    engine.sample_batch(source, [_request(LONG, 8, max_tokens=2)])
    assert engine.counters["prefill_tokens"] - before == len(LONG)  # not 8 x len(LONG)


def test_the_static_cache_layout_samples_the_same_tokens(engine):
    """The CUDA path's layout (the cache shown at its full, padded width; writes by a column tensor), run on the
    CPU: what a captured decode step computes, without the capture."""
    source = engine.sampler_source(None, TINY, None)
    requests = lambda: [_request(SHORT, 3), _request(LONG, 2, seed=8, max_tokens=30)]  # noqa: E731
    dynamic = engine.sample_batch(source, requests())
    engine.sampler.static_cache = True
    try:
        static = engine.sample_batch(source, requests())
    finally:
        engine.sampler.static_cache = None
    assert [_tokens(r) for r in static] == [_tokens(r) for r in dynamic]


def test_non_finite_logits_fail_their_request_with_a_user_error(engine):
    """A model whose forward is NaN answers a clear user error, never NaN logprobs (greedy, sampled, scored)."""
    model_id = "nan-session:train:0"
    engine.create_model(model_id, TINY, {"rank": 4})
    entry = engine.trainer.get(model_id)
    with torch.no_grad():
        for name, param in entry.module.named_parameters():
            if "lora_B" in name:
                param.fill_(float("nan"))
    engine.snapshot_sampler(model_id, "nan-session:sample:0")
    source = engine.sampler_source("nan-session:sample:0", None, None)
    for params in ({"temperature": 1.0}, {"temperature": 0.0}):
        result = engine.sample_batch(source, [_request(SHORT, 2, **params)])[0]
        assert isinstance(result, UserError) and "NaN/inf" in str(result)
    scored = engine.sample_batch(source, [SampleRequest(SHORT, 1, {"max_tokens": 1}, prompt_logprobs=True)])[0]
    assert isinstance(scored, UserError) and "NaN/inf" in str(scored)
    healthy = engine.sample_batch(engine.sampler_source(None, TINY, None), [_request(SHORT, 1)])[0]
    assert np.isfinite(_logprobs(healthy)).all()


def test_the_decoder_fails_only_the_request_whose_rows_turn_non_finite(engine):
    """Weights that are finite on most inputs but NaN on one token (which the engine's probe of the weights
    does not see): the request whose prompt holds it fails with a user error, its batch-mate is answered."""
    import copy

    from dpo_core.local.decode import Decoder

    module = copy.deepcopy(engine.store.base(TINY))
    with torch.no_grad():  # untie the head first: local/tiny's head is its embedding, and every logit would be NaN
        module.lm_head.weight = torch.nn.Parameter(module.lm_head.weight.clone(), requires_grad=False)
        module.get_input_embeddings().weight[100] = float("nan")
    sampler = engine.sampler
    decoder = Decoder(module, module.config.vocab_size, lambda: None, top_k=-1, top_p=1.0,
                      counters=dict(engine.counters))
    source = engine.sampler_source(None, TINY, None)
    jobs = [(0, sampler._decode_job(source, _request(SHORT + [100], 2), module.get_output_embeddings(), 49152)),
            (1, sampler._decode_job(source, _request(SHORT, 2), module.get_output_embeddings(), 49152))]
    answers: dict[int, object] = {}
    decoder.run(jobs, answers.__setitem__)
    assert isinstance(answers[0], UserError) and "NaN/inf" in str(answers[0])
    assert isinstance(answers[1], dict) and np.isfinite(_logprobs(answers[1])).all()


def test_a_request_sent_while_a_batch_decodes_joins_it_instead_of_waiting(tmp_path, registered):
    """Over HTTP, as the SDK sends them: a short request queued behind a long decode of the same sampler is
    answered while the long one is still running (it joined the batch); the old engine made it wait for the
    whole long decode."""
    import time

    import httpx

    from dpo_core.local.launcher import local_server
    from dpo_core.settings import Settings

    long = {"base_model": TINY, "num_samples": 16, "prompt": {"chunks": [{"type": "encoded_text", "tokens": LONG}]},
            "sampling_params": {"max_tokens": 1900, "temperature": 1.0, "seed": 1, "stop": []}}
    short = {**long, "num_samples": 2, "sampling_params": {**long["sampling_params"], "max_tokens": 4}}
    with local_server(Settings(cache_dir=registered, local_storage=tmp_path)) as running, httpx.Client(
            base_url=f"{running.base_url}/api/v1", headers={"X-API-Key": running.api_key}, timeout=60) as http:
        long_id = http.post("/asample", json=long).json()["request_id"]
        time.sleep(0.5)  # the long decode is running
        short_id = http.post("/asample", json=short).json()["request_id"]
        while True:
            answer = http.post("/retrieve_future", json={"request_id": short_id})
            if answer.headers["content-type"] == "application/x-protobuf":
                break
            assert answer.json().get("type") == "try_again", answer.text
        # the long decode was still running: cancelling it now interrupts it (a finished one would not cancel)
        assert http.post("/cancel_future", json={"request_id": long_id}).json() == {"cancelled": True}
        answer = http.post("/retrieve_future", json={"request_id": long_id}).json()
        assert answer["category"] == "user" and "cancelled" in answer["error"]


def test_prompts_that_share_a_prefix_prefill_it_once_and_sample_as_alone(engine):
    """A shared system prompt or rubric is forwarded once for every request that starts with it; each request
    still samples (and scores) what it would alone."""
    source = engine.sampler_source(None, TINY, None)
    shared = [1] + list(range(500, 560))  # 61 tokens every prompt starts with
    prompts = [shared + [700 + i, 800 + i, 900 + i] for i in range(4)]
    alone = [engine.sample_batch(source, [_request(p, 2, seed=i)])[0] for i, p in enumerate(prompts)]
    scored_alone = engine.sample_batch(source, [SampleRequest(prompts[0], 1, {"max_tokens": 1},
                                                              prompt_logprobs=True, topk_prompt_logprobs=3)])[0]
    before = engine.counters["prefill_tokens"]
    together = engine.sample_batch(source, [_request(p, 2, seed=i) for i, p in enumerate(prompts)] + [
        SampleRequest(prompts[0], 1, {"max_tokens": 1}, prompt_logprobs=True, topk_prompt_logprobs=3)])
    assert engine.counters["prefill_tokens"] - before == len(shared) + 5 * 3  # the prefix once, then each rest
    for single, batched in zip(alone, together):
        assert _tokens(batched) == _tokens(single)
        np.testing.assert_allclose(_logprobs(batched), _logprobs(single), rtol=0, atol=1e-4)
    np.testing.assert_allclose(together[4]["prompt_logprobs"], scored_alone["prompt_logprobs"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(together[4]["topk_prompt"][0], scored_alone["topk_prompt"][0])


def test_the_decode_attention_equals_sdpa_on_grouped_heads():
    """The decode step's attention (grouped-query heads read in place) computes sdpa's attention: same layout,
    values equal to float rounding; prefill shapes (several queries) go to sdpa itself."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from dpo_core.local.kv_cache import decode_attention

    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, columns, dim = 6, 9, 3, 37, 64
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    key = torch.randn(rows, kv_heads, columns + 5, dim, generator=generator)[:, :, 5:]  # a view, as the cache gives
    value = torch.randn(rows, kv_heads, columns + 5, dim, generator=generator)[:, :, 5:]
    mask = torch.rand(rows, 1, 1, columns, generator=generator) > 0.3
    mask[..., -1] = True  # the current column, always visible
    ours, _ = decode_attention(module, query, key, value, mask, scaling=dim ** -0.5)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=dim ** -0.5)
    assert ours.shape == theirs.shape == (rows, 1, heads, dim)
    # a softmax-weighted mean of at most `columns` values: rounding of order columns x eps x max|value|
    bound = 4 * columns * torch.finfo(torch.float32).eps * float(value.abs().max())
    assert float((ours - theirs).abs().max()) <= bound
    # a masked column has no weight at all: changing its value changes nothing
    changed = value.clone()
    changed[~mask.reshape(rows, 1, columns, 1).expand_as(changed)] = 1e6
    again, _ = decode_attention(module, query, key, changed, mask, scaling=dim ** -0.5)
    assert torch.equal(again, ours)

    several = torch.randn(rows, heads, 4, dim, generator=generator)
    causal = torch.ones(rows, 1, 4, columns, dtype=torch.bool)
    ours, _ = decode_attention(module, several, key, value, causal, scaling=dim ** -0.5)
    theirs, _ = sdpa_attention_forward(module, several, key, value, causal, scaling=dim ** -0.5)
    assert torch.equal(ours, theirs)


def test_decode_steps_use_the_decode_attention_and_leave_the_model_on_sdpa(engine, monkeypatch):
    """Every decode step's layers call the decode attention; the switch is scoped to the step, so the module
    (shared with the trainer) is on sdpa before and after, and the tokens are those of sdpa's step."""
    from transformers import AttentionInterface

    from dpo_core.local import decode, kv_cache

    source = engine.sampler_source(None, TINY, None)
    module = engine.sampler._module(source)
    calls = []

    def counting(module_, query, *args, **kwargs):
        calls.append(query.shape[2])
        return kv_cache.decode_attention(module_, query, *args, **kwargs)

    AttentionInterface.register(kv_cache.DECODE_ATTENTION, counting)
    try:
        result = engine.sample_batch(source, [_request(SHORT, 3, max_tokens=6)])[0]
    finally:
        AttentionInterface.register(kv_cache.DECODE_ATTENTION, kv_cache.decode_attention)
    # the first token comes from the prefill, each of the other 5 from a decode step: one call per layer each,
    # with one query per row
    assert calls == [1] * (5 * module.config.num_hidden_layers)
    assert module.config._attn_implementation == "sdpa"

    # the same request with the switch off: sdpa's own decode step
    monkeypatch.setattr(decode, "decode_step_attention", lambda config, implementation: contextlib.nullcontext())
    plain = engine.sample_batch(source, [_request(SHORT, 3, max_tokens=6)])[0]
    assert _tokens(plain) == _tokens(result)
    np.testing.assert_allclose(_logprobs(plain), _logprobs(result), rtol=0, atol=1e-4)
