"""Training-memory controls: recomputed layers give the same logprobs and gradients, and keep far less."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpo_core import models
from dpo_core.local.engine import Datum, Engine
from dpo_core.local.memory import recompute_layers, release_freed_memory


def datums() -> list[Datum]:
    """Four sequences of different lengths with signed, partly zero weights (as a DPO step sends them)."""
    rng = np.random.default_rng(5)
    out = []
    for length in (23, 40, 31, 9):
        tokens = rng.integers(0, 49152, length + 1)
        weights = (rng.standard_normal(length) * (rng.random(length) > 0.2)).astype(np.float32)
        out.append(Datum(tokens[:-1].tolist(), tokens[1:].astype(np.int64), weights))
    return out


def trained_gradients(tmp_path, name: str, fraction: float, graph_cache_tokens: int = 16384,
                      micro_batch_tokens: int = 4096) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    engine = Engine(tmp_path / name, tmp_path / "cache", device="cpu", threads=1, recompute_layers=fraction,
                    graph_cache_tokens=graph_cache_tokens, micro_batch_tokens=micro_batch_tokens)
    engine.create_model("m", models.TINY, {"rank": 4, "seed": 0})
    module = engine.trainer.models["m"].module
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # B is zero at init, which would leave A without a gradient
        for param in engine.trainer.models["m"].trainable():
            param.copy_(torch.randn_like(param) * 0.05)
    data = datums()
    engine.forward_backward("m", data, "cross_entropy", forward_only=True)  # forward_backward_custom's order
    outputs, _ = engine.forward_backward("m", data, "cross_entropy", forward_only=False)
    return outputs, [p.grad.clone() for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("fraction,graph_cache_tokens,micro_batch_tokens",
                         [(1.0, 16384, 4096), (0.5, 16384, 4096), (1.0, 0, 4096), (0.5, 16384, 64)])
def test_recomputed_layers_give_the_same_logprobs_and_gradients(tmp_path, fraction, graph_cache_tokens,
                                                                micro_batch_tokens):
    kept_outputs, kept_grads = trained_gradients(tmp_path, "kept", 0.0)
    outputs, grads = trained_gradients(tmp_path, "recomputed", fraction, graph_cache_tokens, micro_batch_tokens)
    for expected, got in zip(kept_outputs, outputs):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert any(float(g.abs().max()) > 0 for g in kept_grads)
    for expected, got in zip(kept_grads, grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def saved_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of activations autograd keeps for the backward of one forward (parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in params:
            storages[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids, use_cache=False).logits.sum()
    return sum(storages.values())


def test_recomputed_layers_keep_only_their_inputs(tmp_path):
    from peft import LoraConfig, get_peft_model

    from dpo_core.local.store import load_model

    def lora_model(fraction: float) -> torch.nn.Module:
        config = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "up_proj"])
        model = get_peft_model(load_model(models.TINY, tmp_path), config).eval()
        assert recompute_layers(model, fraction) == ([0, 1] if fraction == 1.0 else [])
        return model

    input_ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    kept, recomputed = saved_bytes(lora_model(0.0), input_ids), saved_bytes(lora_model(1.0), input_ids)
    # What stays: each layer's input and the final norm + head; the tiny model's logits dominate both counts, so
    # the check is on the layers' share only.
    head_and_norm = 2 * 64 * 49152 * 4 * 2
    assert recomputed - head_and_norm < 0.35 * (kept - head_and_norm)


def test_recompute_fraction_spreads_layers_and_is_checked(tmp_path):
    from dpo_core.local.store import load_model

    model = load_model(models.TINY, tmp_path)
    with pytest.raises(ValueError, match="within"):
        recompute_layers(model, 1.5)
    assert recompute_layers(model, 0.5) == [0]


def test_release_freed_memory_is_a_noop_at_zero():
    assert release_freed_memory(0) is False
