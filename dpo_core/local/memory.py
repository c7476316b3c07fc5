"""Peak-memory controls of the local server's training passes: layer recomputation and the allocator.

A LoRA training step on a CPU keeps, per token, every decoder layer's activations for the backward: about
1.2 MB per token for SmolLM2-135M in fp32 (30 layers x ~40 KB: MLP intermediates, attention inputs, LoRA
inputs), kept from `forward` until `forward_backward` of `forward_backward_custom` (`trainer.py`). Two things
bound that here:
- `recompute_layers`: a chosen share of the decoder layers keeps only its input (2.3 KB per token for SmolLM2)
  and recomputes its activations during the backward (activation checkpointing, exact: the same ops on the
  same inputs), at the price of one more forward of those layers;
- `release_freed_memory`: glibc raises its mmap threshold as large blocks are freed, after which freed
  activations stay in the heap and RSS never falls (measured: one SmolLM2 step of 2,660 tokens peaked at 7.3 GB
  RSS with glibc's dynamic threshold, 4.5 GB with a fixed one).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from dpo_core.local.logprobs import causal_lm_parts

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def release_freed_memory(threshold_bytes: int) -> bool:
    """Serve heap allocations of `threshold_bytes` or more by mmap, so freeing them returns them to the OS.

    Fixing the threshold (glibc's M_MMAP_THRESHOLD) also turns off glibc's dynamic raising of it. Process-wide;
    0 leaves the allocator alone. False where there is no glibc (musl, macOS) or it refused.
    """
    if threshold_bytes <= 0:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder's stack of layers (`model.layers` in the Llama family), peft-wrapped or not."""
    decoder, _ = causal_lm_parts(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise NotImplementedError(f"{type(decoder).__name__} has no `layers` list: layer recomputation needs one")
    return layers


def recompute_layers(model: Any, fraction: float) -> list[int]:
    """Make `fraction` of the decoder layers (evenly spread) recompute their activations in backward.

    Each chosen layer's forward runs under non-reentrant `torch.utils.checkpoint` whenever grad is enabled:
    autograd keeps the layer's inputs only, and the backward reruns the layer to get the rest. Gradients are
    the same as without (same ops, same inputs; the layers have no dropout). Returns the chosen layer indices.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1], got {fraction}")
    layers = decoder_layers(model)
    count = round(fraction * len(layers))
    chosen = sorted({int(i * len(layers) / count) for i in range(count)}) if count else []
    for index in chosen:
        layer = layers[index]
        layer.forward = functools.partial(_checkpointed, layer.forward)
    return chosen


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    # No RNG to replay (no dropout), so its state is not saved and restored around each layer.
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
