"""The real tinker SDK against the local server over loopback, on `local/tiny`."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
import tinker
import torch
from safetensors.torch import load_file

from dpo_core import rendering
from dpo_core.data import PreferencePair
from dpo_core.local.launcher import local_server
from dpo_core.loss import dpo_loss
from dpo_core.settings import Settings
from dpo_core.train import RenderedPair, render_pairs
from tests.helpers.reference import base_reference

TINY = "local/tiny"
PROMPT = [{"role": "user", "content": "Name a colour."}]


def _rendered(renderer) -> list[RenderedPair]:
    """Two chosen/rejected pairs, rendered by the training loop's own datum builder."""
    hello = ({"role": "user", "content": "Say hello."},)
    pairs = [
        PreferencePair(tuple(PROMPT), ({"role": "assistant", "content": "Blue, like a clear summer sky."},),
                       ({"role": "assistant", "content": "No."},), row=0),
        PreferencePair(hello, ({"role": "assistant", "content": "Hello! Lovely to meet you."},),
                       ({"role": "assistant", "content": "Go away."},), row=1),
    ]
    return render_pairs(pairs, renderer, max_length=256, source="test pairs")


def _pairs(renderer) -> list[tinker.Datum]:
    """The datums of `_rendered`, chosen then rejected, as one DPO batch sends them."""
    return [datum for pair in _rendered(renderer) for datum in (pair.chosen, pair.rejected)]


def _dpo_loss_fn(beta: float, reference: np.ndarray):
    """`forward_backward_custom`'s loss: dpo_core's DPO loss over token-summed (weighted) logprobs."""

    def loss_fn(data, logprobs_list):
        sums = torch.stack([(lp * torch.tensor(d.loss_fn_inputs["weights"].to_numpy())).sum()
                            for d, lp in zip(data, logprobs_list)])
        ref = torch.tensor(reference, dtype=sums.dtype)
        return dpo_loss(sums[0::2], sums[1::2], ref[:, 0], ref[:, 1], beta)

    return loss_fn


@pytest.fixture(scope="module")
def renderer(registered):
    return rendering.get_renderer(TINY)


def test_capabilities_list_served_models(service_client):
    names = {m.model_name for m in service_client.get_server_capabilities().supported_models}
    assert {"local/tiny", "HuggingFaceTB/SmolLM2-135M-Instruct"} <= names


def test_dpo_steps_reduce_loss_and_change_adapter(service_client, server, renderer, tmp_path):
    client = service_client.create_lora_training_client(base_model=TINY, rank=8, seed=3).result()
    data = _pairs(renderer)
    reference = base_reference(service_client, TINY, _rendered(renderer), tmp_path / "reference.npy")
    reused_before = server.engine.counters["graph_reuse_microbatches"]
    losses = []
    for _ in range(6):
        fwd = client.forward_backward_custom(data, _dpo_loss_fn(0.5, reference))
        step = client.optim_step(tinker.AdamParams(learning_rate=5e-3))  # submitted without waiting
        losses.append(fwd.result().metrics["dpo_loss"])
        step.result()
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # the adapter starts as the identity
    assert losses[-1] < math.log(2) - 0.05
    # The forward-only pass kept its graph: the backward reused it instead of recomputing.
    assert server.engine.counters["graph_reuse_microbatches"] - reused_before >= 6
    path = client.save_state("trained").result().path
    _, _, _, folder = server.engine.checkpoint_dir(path)
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and max(float(v.abs().max()) for v in lora_b) > 0  # B starts at zero


def test_sampling_properties(service_client, renderer):
    sampler = service_client.create_sampling_client(base_model=TINY).result()
    prompt = renderer.build_generation_prompt(PROMPT)
    params = tinker.SamplingParams(max_tokens=7, seed=11, temperature=1.0)
    first = sampler.sample(prompt, num_samples=3, sampling_params=params).result()
    again = sampler.sample(prompt, num_samples=3, sampling_params=params).result()
    assert len(first.sequences) == 3
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert all(len(s.tokens) <= 7 for s in first.sequences)
    assert all(len(s.logprobs) == len(s.tokens) for s in first.sequences)
    assert len({tuple(s.tokens) for s in first.sequences}) > 1  # distinct samples
    other = sampler.sample(prompt, num_samples=1,
                           sampling_params=tinker.SamplingParams(max_tokens=7, seed=12)).result()
    assert other.sequences[0].tokens != first.sequences[0].tokens
    # A stop token ends the sequence on it, with stop_reason "stop".
    stop_token = first.sequences[0].tokens[2]
    stopped = sampler.sample(prompt, num_samples=1, sampling_params=tinker.SamplingParams(
        max_tokens=7, seed=11, stop=[stop_token])).result().sequences[0]
    assert stopped.tokens == first.sequences[0].tokens[:3] and stopped.stop_reason == "stop"
    # A stop string ends the sequence once the decoded text contains it.
    text = renderer.tokenizer.decode(first.sequences[0].tokens[:4])
    needle = text.strip()[-2:] if len(text.strip()) >= 2 else text
    by_string = sampler.sample(prompt, num_samples=1, sampling_params=tinker.SamplingParams(
        max_tokens=7, seed=11, stop=[needle])).result().sequences[0]
    assert by_string.stop_reason == "stop" and needle in renderer.tokenizer.decode(by_string.tokens)
    assert len(by_string.tokens) <= 4
    # Requests in flight together share one batched generation; each still gets its own tokens.
    prompts = [prompt, renderer.build_generation_prompt([{"role": "user", "content": "A much longer prompt "
                                                                   "that needs left padding in the batch."}])]
    alone = [sampler.sample(p, 2, tinker.SamplingParams(max_tokens=6, seed=s)).result() for p, s in zip(prompts, (1, 2))]
    together = [sampler.sample(p, 2, tinker.SamplingParams(max_tokens=6, seed=s)) for p, s in zip(prompts, (1, 2))]
    for single, batched in zip(alone, together):
        assert [s.tokens for s in single.sequences] == [s.tokens for s in batched.result().sequences]
    greedy = tinker.SamplingParams(max_tokens=5, temperature=0.0)
    assert sampler.sample(prompt, 1, greedy).result().sequences[0].tokens == \
        sampler.sample(prompt, 1, greedy).result().sequences[0].tokens


def test_compute_logprobs_equals_training_forward(service_client, renderer):
    client = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=1).result()
    data = _pairs(renderer)[:2]
    client.forward_backward(data, "cross_entropy").result()
    client.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    trained = client.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    sampler_path = client.save_weights_for_sampler("after-one-step").result().path
    sampler = service_client.create_sampling_client(model_path=sampler_path).result()
    tokens = data[0].model_input.to_ints() + [int(data[0].loss_fn_inputs["target_tokens"].to_numpy()[-1])]
    logprobs = sampler.compute_logprobs(tinker.ModelInput.from_ints(tokens)).result()
    assert logprobs[0] is None
    np.testing.assert_allclose(np.array(logprobs[1:], dtype=np.float32), trained, atol=2e-4)
    base = service_client.create_sampling_client(base_model=TINY).result().compute_logprobs(
        tinker.ModelInput.from_ints(tokens)).result()
    assert not np.allclose(np.array(base[1:], dtype=np.float32), trained, atol=1e-4)  # the weights moved


def test_resume_with_optimizer_state_continues_identically(service_client, renderer):
    data = _pairs(renderer)
    client = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=2).result()
    adam = tinker.AdamParams(learning_rate=1e-2)
    for _ in range(2):
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(adam).result()
    state_path = client.save_state("two-steps").result().path
    resumed = service_client.create_training_client_from_state_with_optimizer(state_path).result()
    fresh_optimizer = service_client.create_training_client_from_state(state_path).result()
    outputs = []
    for each in (client, resumed, fresh_optimizer):
        each.forward_backward(data, "cross_entropy").result()
        each.optim_step(adam).result()
        outputs.append(each.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy())
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-6)  # same weights + same Adam moments
    assert not np.allclose(outputs[2], outputs[0], atol=1e-6)  # Adam restarted: a different step


def test_ephemeral_sampler_sees_current_weights(service_client, renderer):
    client = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    data = _pairs(renderer)[:2]
    before = client.save_weights_and_get_sampling_client().result()
    client.forward_backward(data, "cross_entropy").result()
    client.optim_step(tinker.AdamParams(learning_rate=5e-2)).result()
    after = client.save_weights_and_get_sampling_client().result()
    tokens = tinker.ModelInput.from_ints(data[0].model_input.to_ints())
    assert before.compute_logprobs(tokens).result()[1:] != after.compute_logprobs(tokens).result()[1:]


def test_user_errors_are_raised_not_retried(service_client):
    with pytest.raises(Exception, match="not served by the local backend"):
        service_client.create_lora_training_client(base_model="Qwen/Qwen3-4B-Instruct-2507", rank=4).result()
    with pytest.raises(Exception, match="checkpoint not found|escapes|invalid tinker path"):
        service_client.create_sampling_client(model_path="tinker://nope/sampler_weights/missing").result()


@pytest.mark.parametrize("path", [
    "tinker://../../etc/weights/passwd", "tinker://run/weights/..", "tinker://run/sampler_weights/a/b",
    "file:///etc/passwd", "tinker://run/other/x",
])
def test_paths_outside_storage_are_refused(server, path):
    from dpo_core.local.validation import UserError

    with pytest.raises(UserError):
        server.engine.checkpoint_dir(path)


def test_requests_need_the_server_key(server):
    for headers in ({}, {"X-API-Key": "tml-wrong"}):
        reply = httpx.get(f"{server.base_url}/api/v1/healthz", headers=headers)
        assert reply.status_code == 401
    assert httpx.get(f"{server.base_url}/api/v1/healthz", headers={"X-API-Key": server.api_key}).json() == {"status": "ok"}
    with tinker.ServiceClient(base_url=server.base_url, api_key="tml-wrong") as wrong:
        with pytest.raises(Exception):
            wrong.get_server_capabilities()


def test_binds_loopback_by_default(server):
    assert server.base_url.startswith("http://127.0.0.1:")


def test_restarted_server_serves_old_checkpoints(tmp_path, registered, renderer):
    settings = Settings(cache_dir=registered, local_storage=tmp_path / "storage")
    prompt = renderer.build_generation_prompt(PROMPT)
    params = tinker.SamplingParams(max_tokens=6, seed=5)
    with local_server(settings) as first:
        with tinker.ServiceClient(base_url=first.base_url, api_key=first.api_key) as service:
            client = service.create_lora_training_client(base_model=TINY, rank=4).result()
            client.forward_backward(_pairs(renderer)[:2], "cross_entropy").result()
            client.optim_step(tinker.AdamParams(learning_rate=5e-2)).result()
            sampler_path = client.save_weights_for_sampler("final").result().path
            state_path = client.save_state("final").result().path
            sampler = service.create_sampling_client(model_path=sampler_path).result()
            expected = sampler.sample(prompt, 1, params).result()
    with local_server(settings) as second:
        with tinker.ServiceClient(base_url=second.base_url, api_key=second.api_key) as service:
            again = service.create_sampling_client(model_path=sampler_path).result().sample(prompt, 1, params).result()
            assert again.sequences[0].tokens == expected.sequences[0].tokens
            rest = service.create_rest_client()
            run_id = sampler_path.split("/")[2]
            run = rest.get_training_run(run_id).result()
            assert run.base_model == TINY and run.lora_rank == 4
            paths = {c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints}
            assert {sampler_path, state_path} <= paths
            rest.delete_checkpoint_from_tinker_path(sampler_path).result()
            assert sampler_path not in {c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints}


def test_fault_injection_is_survived_by_the_sdk(tmp_path, registered, renderer):
    settings = Settings(cache_dir=registered, local_storage=tmp_path / "storage")
    with local_server(settings, fault_rate=0.2, fault_seed=7) as faulty:
        with tinker.ServiceClient(base_url=faulty.base_url, api_key=faulty.api_key) as service:
            client = service.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
            data = _pairs(renderer)[:2]
            for _ in range(3):
                client.forward_backward(data, "cross_entropy").result()
                client.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
            assert faulty.app.state.fault_counts["injected"] > 0
            assert faulty.engine.counters["forward_backward_requests"] == 3  # each step ran exactly once
