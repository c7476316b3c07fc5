"""Merge a LoRA adapter into a low-precision sampling copy without rounding the adapter away.

Why not `W_bf16 += scale * B @ A`: a bf16 weight near 0.03 has a spacing of 1.2e-4, so every delta entry under
half of that (6e-5) rounds back to the base weight; with deltas of ~1e-4 (a few DPO steps at lr 1e-5) about half
of them vanish, and the sampler serves something between the base and the trained policy. Merging into fp32
and casting the result to bf16 once does not help: the stored weight is still bf16 and has the same spacing.

So the merged weight is computed in fp32 from the weights the trainer adapted (its "master" copy) and stored as
two tensors of the sampling dtype, `high = bf16(W)` and `low = bf16(W - high)`: their sum carries ~16 mantissa
bits, enough for deltas down to ~1e-7 relative, and a layer computes `x @ high.T + x @ low.T` with the
sampling dtype's kernels (so the KV cache, activations and every other layer stay as they were). In fp32 the
merge is a plain in-place add: fp32 already resolves the delta.

How the engine calls it, in place of `_merge_lora(merged, state, scale)`:

    merged = copy.deepcopy(base)                       # the base in the engine's dtype (bf16 on CUDA)
    merge_lora(merged, state, scale=LORA_ALPHA / rank)  # masters default to the trainer's own base weights

`masters` is only needed when the trainer's base weights differ from the sampling copy's (e.g. an fp32 trainer
and a bf16 sampler): pass `fp32_masters(fp32_model, state)` then.
"""

from __future__ import annotations

from typing import Any

import torch

_PEFT_PREFIX = "base_model.model."


class SplitPrecisionLinear(torch.nn.Module):
    """A linear layer whose weight is `high + low`, both in a low-precision dtype: y = x W^T + b, W ~ fp32."""

    def __init__(self, high: torch.Tensor, low: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = high.shape[1], high.shape[0]
        self.register_buffer("high", high)
        self.register_buffer("low", low)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight in fp32 (for inspection; the forward never builds it)."""
        return self.high.float() + self.low.float()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(inputs, self.high, self.bias) + torch.nn.functional.linear(inputs, self.low)


def adapted_layers(adapter_state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (lora_A [r, in], lora_B [out, r]) for every layer a peft adapter state adapts."""
    layers = {}
    for key, lora_a in adapter_state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        prefix = key[: -len(".lora_A.weight")]
        layers[prefix.removeprefix(_PEFT_PREFIX)] = (lora_a, adapter_state[prefix + ".lora_B.weight"])
    return layers


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B @ A in fp32."""
    return (lora_b.float() @ lora_a.float()) * scale


def fp32_masters(module: Any, adapter_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 copies of the weights an adapter touches, from a module that holds the trainer's base weights."""
    return {path: module.get_submodule(path).weight.detach().float().clone() for path in adapted_layers(adapter_state)}


@torch.no_grad()
def merge_lora(module: Any, adapter_state: dict[str, torch.Tensor], scale: float,
               masters: dict[str, torch.Tensor] | None = None) -> int:
    """Merge `scale * B @ A` into every adapted linear of `module`, exactly to fp32 precision; returns the count.

    Layers in fp32 get `W += delta`. Layers in a lower precision become `SplitPrecisionLinear` modules holding
    `W_master + delta` (fp32) as a high and a low part. `masters` maps module paths to the fp32 base weights the
    adapter was trained against; by default the layer's own weight, upcast (what a trainer on this base used).
    """
    count = 0
    for path, (lora_a, lora_b) in adapted_layers(adapter_state).items():
        target = module.get_submodule(path)
        weight = target.weight
        master = masters[path] if masters is not None else weight.detach().float()
        merged = master.to(weight.device) + lora_delta(lora_a, lora_b, scale).to(weight.device)
        if weight.dtype == torch.float32:
            weight.copy_(merged)
        else:
            high = merged.to(weight.dtype)
            low = (merged - high.float()).to(weight.dtype)
            bias = None if target.bias is None else target.bias.detach()
            _replace_submodule(module, path, SplitPrecisionLinear(high, low, bias))
        count += 1
    return count


def _replace_submodule(module: Any, path: str, replacement: torch.nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    setattr(parent, name, replacement)
