"""Chunked per-token logprobs: the same numbers and gradients as full logits, without [T x V] saved for backward."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dpo_core import models
from dpo_core.local import store
from dpo_core.local.logprobs import (causal_lm_token_logprobs, final_hidden_states, prompt_logprobs,
                                     token_logprobs)

VOCAB = 49152  # SmolLM2's: the size that makes full logits the biggest tensor of a step
CHUNK = 16  # much smaller than the 2 x 37 positions below, so every test crosses chunk boundaries


def tied_model() -> torch.nn.Module:
    """The repo's own `local/tiny` (Llama layout, tied embeddings, SmolLM2 vocab), in fp32."""
    return store.load_model(models.TINY, cache_dir=Path("/nonexistent"))


def untied_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = LlamaForCausalLM(config)
    return model.eval().requires_grad_(False)


def with_lora(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    """A peft LoRA with random A and B (B is zero at peft's default init, which would hide gradient bugs)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0, target_modules=targets, bias="none",
                        init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return get_peft_model(copy.deepcopy(model), config).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    input_ids = torch.randint(0, VOCAB, (2, 37), generator=generator)
    targets = torch.randint(0, VOCAB, (2, 37), generator=generator)
    # Per-token weights as a DPO step sends them (signed, some zero), so the backward is not a plain sum.
    weights = torch.randn((2, 37), generator=generator) * (torch.rand((2, 37), generator=generator) > 0.2)
    return input_ids, targets, weights


def full_logits_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Today's engine path: all logits, then gather - logsumexp."""
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def logprobs_and_grads(model: torch.nn.Module, params: list[torch.Tensor], chunked: bool):
    input_ids, targets, weights = batch()
    for param in params:
        param.grad = None
    if chunked:
        logprobs = causal_lm_token_logprobs(model, input_ids, targets, chunk_tokens=CHUNK)
    else:
        logprobs = full_logits_logprobs(model, input_ids, targets)
    (-(logprobs * weights).sum()).backward()
    return logprobs.detach(), [param.grad.clone() for param in params]


def assert_chunked_equals_full(model: torch.nn.Module, params: list[torch.Tensor]) -> None:
    full, full_grads = logprobs_and_grads(model, params, chunked=False)
    chunked, chunked_grads = logprobs_and_grads(model, params, chunked=True)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)
    for chunked_grad, full_grad in zip(chunked_grads, full_grads):
        assert_same_gradient(chunked_grad, full_grad)


def assert_same_gradient(chunked: torch.Tensor, full: torch.Tensor) -> None:
    """Equal within fp32 summation-order noise, relative to the gradient's own scale.

    Each gradient entry reduces over every position and every vocabulary row (2 x 37 x 49152 terms); the two
    paths sum them in different orders (chunks vs one matmul, and each BLAS picks its own blocking per CPU), so
    the difference is bounded by ~eps * sqrt(terms) of the scale (random-walk rounding), times a safety factor
    of 4. A real gradient bug is off by O(1) of the scale, ~250x above this bound.
    """
    scale = float(full.abs().max())
    assert scale > 0  # the comparison would be empty otherwise
    terms = 2 * 37 * VOCAB
    tolerance = 4 * torch.finfo(torch.float32).eps * terms ** 0.5
    assert float((chunked - full).abs().max()) <= tolerance * max(scale, 1.0)


def test_tied_embeddings_logprobs_and_gradients_match_full_logits():
    model = tied_model()
    embedding = model.get_input_embeddings().weight
    assert embedding is model.get_output_embeddings().weight  # tied: one tensor, two uses
    layer_weight = model.model.layers[0].self_attn.q_proj.weight
    embedding.requires_grad_(True)
    layer_weight.requires_grad_(True)
    # The embedding's gradient sums its input-side and output-side uses; both paths must agree.
    assert_chunked_equals_full(model, [embedding, layer_weight])


def test_peft_lora_gradients_match_full_logits():
    model = with_lora(tied_model(), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    assert_chunked_equals_full(model, params)


def test_lora_on_an_untied_lm_head_is_folded_into_the_head_weight():
    model = with_lora(untied_model(), ["q_proj", "lm_head"])
    head_params = [p for name, p in model.named_parameters() if "lm_head" in name and p.requires_grad]
    assert len(head_params) == 2
    assert_chunked_equals_full(model, [p for p in model.parameters() if p.requires_grad])


def test_hidden_states_gradient_matches_and_leading_shape_is_kept():
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn((3, 5, 8), generator=generator, requires_grad=True)
    weight = torch.randn((50, 8), generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (3, 5), generator=generator)
    upstream = torch.randn((3, 5), generator=generator)

    chunked = token_logprobs(hidden, weight, targets, chunk_tokens=4, bias=bias)
    chunked_grads = torch.autograd.grad((chunked * upstream).sum(), [hidden, weight, bias])
    full = torch.log_softmax(hidden @ weight.T + bias, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    full_grads = torch.autograd.grad((full * upstream).sum(), [hidden, weight, bias])

    assert chunked.shape == (3, 5)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)
    for chunked_grad, full_grad in zip(chunked_grads, full_grads):
        assert_same_gradient(chunked_grad, full_grad)


def saved_for_backward(run) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward while `run()` builds its graph."""
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return saved


def test_no_tokens_by_vocab_tensor_is_saved_for_backward():
    model = with_lora(tied_model(), ["q_proj", "v_proj", "down_proj"])
    unembedding = model.get_base_model().get_output_embeddings().weight
    input_ids, targets, weights = batch()

    def chunked() -> None:
        (causal_lm_token_logprobs(model, input_ids, targets, chunk_tokens=CHUNK) * weights).sum().backward()

    def full() -> None:
        (full_logits_logprobs(model, input_ids, targets) * weights).sum().backward()

    def vocab_sized(saved: list[torch.Tensor]) -> list[tuple[int, ...]]:
        """Shapes of saved tensors with a vocab axis, other than the [V, H] unembedding weight itself."""
        return [tuple(t.shape) for t in saved
                if VOCAB in t.shape and t.data_ptr() != unembedding.data_ptr()]

    # The detector itself: going back to full logits saves [B, T, V] tensors (logits, log-normalised ones).
    assert (2, 37, VOCAB) in vocab_sized(saved_for_backward(full))
    # Chunked: not even one chunk's logits is kept; the backward recomputes them.
    assert vocab_sized(saved_for_backward(chunked)) == []


def test_prompt_logprobs_and_top_k_match_full_log_softmax():
    model = tied_model()
    input_ids, targets, _ = batch()
    with torch.no_grad():
        hidden, head = final_hidden_states(model, input_ids)
        scored = prompt_logprobs(hidden[0], head.weight, targets[0], top_k=5, chunk_tokens=CHUNK)
        full = torch.log_softmax(model(input_ids=input_ids).logits[0].float(), dim=-1)
    top_values, top_ids = torch.topk(full, k=5, dim=-1)
    torch.testing.assert_close(scored.logprobs, full.gather(-1, targets[0, :, None]).squeeze(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(scored.top_logprobs, top_values, rtol=0, atol=1e-5)
    assert torch.equal(scored.top_ids, top_ids)


def test_bf16_chunked_logprobs_match_the_models_own_bf16_logits():
    """The engine's CUDA dtype: chunked scoring rounds exactly like the model's lm_head, then works in fp32."""
    model = tied_model().to(torch.bfloat16)
    input_ids, targets, _ = batch()
    with torch.no_grad():
        chunked = causal_lm_token_logprobs(model, input_ids, targets, chunk_tokens=CHUNK)
        full = full_logits_logprobs(model, input_ids, targets)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-4)


def test_rejects_models_whose_logits_are_not_a_plain_unembedding():
    model = tied_model()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        final_hidden_states(model, torch.tensor([[1, 2, 3]]))
