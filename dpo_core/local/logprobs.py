"""Per-token logprobs from final hidden states without materialising [tokens x vocab] logits.

A causal LM's last step, `logits = hidden @ W_unembed.T`, is the largest tensor of a training step: for SmolLM2
(vocab 49152) 4096 tokens of fp32 logits are 0.8 GB, and autograd keeps them (plus the log-softmax) alive until
backward. Here the logits exist one chunk of positions at a time: the forward keeps only each position's
log-normaliser, and the backward recomputes each chunk's logits to form its gradient. Peak extra memory is
`chunk_tokens x vocab` floats, whatever the sequence length or batch.

How the engine calls it (instead of `module(input_ids=...).logits`):

    hidden, head = final_hidden_states(module, input_ids)          # [B, T, H]; peft-wrapped or not
    rows = [hidden[r, :n] for r, n in enumerate(lengths)]         # drop the right padding before the head
    logprobs = token_logprobs(torch.cat(rows), head.weight, torch.cat(targets), bias=head.bias)
    per_datum = logprobs.split(lengths)                           # fp32, differentiable

and for prompt logprobs (no gradient) `prompt_logprobs(hidden[r, pad:-1], head.weight, targets, top_k=k)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_CHUNK_TOKENS = 1024  # 1024 x 49152 fp32 = 0.2 GB of live logits at most, on any device


# ----------------------------------------------------------------------------------------------
# Chunked logprobs with a recomputing backward
# ----------------------------------------------------------------------------------------------


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """logprob[n] = logits[n, target[n]] - logsumexp(logits[n]), logits = hidden @ weight.T + bias, by chunks.

    Saved for backward: hidden [N, H], weight and bias (references, not copies), targets [N] and the fp32
    log-normalisers [N]. Never a [N, V] tensor.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        logprobs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_norm = torch.empty_like(logprobs)
        for start in range(0, hidden.shape[0], chunk_tokens):
            stop = start + chunk_tokens
            logits = _chunk_logits(hidden[start:stop], weight, bias)
            log_norm[start:stop] = torch.logsumexp(logits, dim=-1)
            logprobs[start:stop] = logits.gather(-1, targets[start:stop, None]).squeeze(-1) - log_norm[start:stop]
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm)
        ctx.chunk_tokens = chunk_tokens
        return logprobs

    @staticmethod
    def backward(ctx: Any, grad_logprobs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, log_norm = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # Weight gradients accumulate over chunks in fp32, then take the parameter's dtype once.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        grad_logprobs = grad_logprobs.float()
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            stop = start + ctx.chunk_tokens
            upstream = grad_logprobs[start:stop]
            # d logprob / d logits = onehot(target) - softmax; built in place in the recomputed logits buffer.
            grad_logits = _chunk_logits(hidden[start:stop], weight, bias)
            grad_logits.sub_(log_norm[start:stop, None]).exp_().mul_(-upstream[:, None])
            grad_logits.scatter_add_(-1, targets[start:stop, None], upstream[:, None])
            if needs_hidden:
                grad_hidden[start:stop] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if needs_weight:
                grad_weight += grad_logits.T @ hidden[start:stop].float()
            if needs_bias:
                grad_bias += grad_logits.sum(dim=0)
        return (grad_hidden,
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The matmul runs in the model's dtype, as the model's own lm_head would (so bf16 trainer and sampler logits
    # agree); the normalisation runs in fp32.
    logits = hidden.to(weight.dtype) @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.float()


def token_logprobs(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, target_tokens: torch.Tensor,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 log p(target | position) for hidden states [..., H] and targets [...], by chunks of positions.

    Differentiable w.r.t. `hidden_states`, `lm_head_weight` and `bias` (whichever require grad; a tied
    embedding's gradient adds up with its input-side use as usual). Equals `log_softmax(hidden @ W.T + b)`
    gathered at the targets, without keeping [..., V] logits for backward.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden_states.shape[:-1] != target_tokens.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and target_tokens "
                         f"{tuple(target_tokens.shape)} must agree on every dimension but the last")
    leading = target_tokens.shape
    flat_hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat_targets = target_tokens.reshape(-1).to(device=flat_hidden.device, dtype=torch.long)
    logprobs = _ChunkedTokenLogprobs.apply(flat_hidden, lm_head_weight, bias, flat_targets, int(chunk_tokens))
    return logprobs.reshape(leading)


@dataclass(frozen=True)
class PromptLogprobs:
    """Scores of a prompt's tokens: `logprobs` [N]; with top_k, the top `top_k` ids and logprobs [N, k]."""

    logprobs: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


@torch.no_grad()
def prompt_logprobs(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, target_tokens: torch.Tensor,
                    top_k: int = 0, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                    bias: torch.Tensor | None = None) -> PromptLogprobs:
    """Target logprobs and, when `top_k` > 0, the top-k next tokens per position, chunk by chunk (no gradient)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    flat_hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat_targets = target_tokens.reshape(-1).to(device=flat_hidden.device, dtype=torch.long)
    count = flat_hidden.shape[0]
    logprobs = torch.empty(count, dtype=torch.float32, device=flat_hidden.device)
    top_ids = torch.empty((count, top_k), dtype=torch.long, device=flat_hidden.device) if top_k else None
    top_logprobs = torch.empty((count, top_k), dtype=torch.float32, device=flat_hidden.device) if top_k else None
    for start in range(0, count, chunk_tokens):
        stop = start + chunk_tokens
        logits = _chunk_logits(flat_hidden[start:stop], lm_head_weight, bias)
        logits -= torch.logsumexp(logits, dim=-1, keepdim=True)
        logprobs[start:stop] = logits.gather(-1, flat_targets[start:stop, None]).squeeze(-1)
        if top_k:
            values, ids = torch.topk(logits, k=top_k, dim=-1)
            top_logprobs[start:stop], top_ids[start:stop] = values, ids
    return PromptLogprobs(logprobs, top_ids, top_logprobs)


# ----------------------------------------------------------------------------------------------
# Running a HF causal LM up to its final norm
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputHead:
    """The unembedding as tensors: logits = hidden @ weight.T + bias (LoRA on lm_head already folded in)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


# Config fields that change logits after the unembedding matmul; a model that sets them is refused rather than
# scored wrong (Gemma 2 soft-caps logits, Cohere and Granite scale them).
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def causal_lm_parts(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder, output embedding) of a HF causal LM, whether or not peft wraps it."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    for field, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(hf_model.config, field, neutral)
        if value is not None and value != neutral:
            raise NotImplementedError(f"{type(hf_model).__name__} sets config.{field}={value!r}; chunked "
                                      "logprobs only cover logits = hidden @ W.T + b")
    prefix = getattr(hf_model, "base_model_prefix", "")
    decoder = getattr(hf_model, prefix, None) if prefix else None
    if not isinstance(decoder, torch.nn.Module) or decoder is hf_model:
        decoder = hf_model.get_decoder()
    head = hf_model.get_output_embeddings()
    if head is None:
        raise NotImplementedError(f"{type(hf_model).__name__} has no output embedding")
    return decoder, head


def output_head(head: torch.nn.Module) -> OutputHead:
    """The effective unembedding weight and bias of a plain or peft-LoRA-adapted linear head.

    A LoRA on lm_head (untied models with train_unembed) is folded in as weight + scale * B @ A: a [V, H]
    tensor, the size of the weight itself, through which gradients reach A and B.
    """
    base = getattr(head, "base_layer", None)
    if base is None:
        return OutputHead(head.weight, getattr(head, "bias", None))
    weight = base.weight
    if not getattr(head, "merged", False) and not getattr(head, "disable_adapters", False):
        for adapter in head.active_adapters:
            if adapter not in head.lora_A:
                continue
            if getattr(head, "use_dora", {}).get(adapter, False):
                raise NotImplementedError("DoRA on the output head is not supported by chunked logprobs")
            dropout = head.lora_dropout[adapter]
            if head.training and not isinstance(dropout, torch.nn.Identity) and dropout.p > 0:
                raise NotImplementedError("LoRA dropout on the output head cannot be folded into its weight")
            weight = weight + head.get_delta_weight(adapter).to(weight.dtype)
    return OutputHead(weight, getattr(base, "bias", None))


def final_hidden_states(model: Any, input_ids: torch.Tensor, **decoder_kwargs: Any) -> tuple[torch.Tensor, OutputHead]:
    """Run a HF causal LM (peft-wrapped or not) up to its final norm: (hidden [B, T, H], its output head).

    `decoder_kwargs` go to the decoder (attention_mask, position_ids...); `use_cache` defaults to False.
    """
    decoder, head = causal_lm_parts(model)
    decoder_kwargs.setdefault("use_cache", False)
    hidden = decoder(input_ids=input_ids, **decoder_kwargs).last_hidden_state
    return hidden, output_head(head)


def causal_lm_token_logprobs(model: Any, input_ids: torch.Tensor, target_tokens: torch.Tensor,
                             chunk_tokens: int = DEFAULT_CHUNK_TOKENS, **decoder_kwargs: Any) -> torch.Tensor:
    """fp32 logprobs [B, T] of `target_tokens` [B, T] under `model` given `input_ids` [B, T], by chunks."""
    hidden, head = final_hidden_states(model, input_ids, **decoder_kwargs)
    return token_logprobs(hidden, head.weight, target_tokens.to(hidden.device), chunk_tokens, bias=head.bias)
