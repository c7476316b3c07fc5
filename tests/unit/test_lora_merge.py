"""LoRA merged for bf16 sampling keeps the trained delta; today's in-place bf16 merge rounds much of it away.

The setting of issue 16: a bf16 base whose adapted weights are ~0.03 (bf16 spacing 1.2e-4 there) and a LoRA
delta of ~1e-4 per entry, as after a few DPO steps. The "trained policy" is what a bf16 trainer computes: its
bf16 base weights plus the delta (peft adds the LoRA path in activation space, so nothing rounds it).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from dpo_core import models
from dpo_core.local import store
from dpo_core.local.logprobs import causal_lm_token_logprobs
from dpo_core.local.lora_merge import SplitPrecisionLinear, adapted_layers, fp32_masters, lora_delta, merge_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 8
SCALE = 32 / RANK  # the engine's alpha / rank
WEIGHT_SIZE = 0.03  # mean |w| of the adapted weights
DELTA_STD = 1e-4


def bf16_base() -> torch.nn.Module:
    """`local/tiny` with its adapted weights rescaled to mean |w| = 0.03, stored in bf16 like the CUDA engine's."""
    model = store.load_model(models.TINY, cache_dir=Path("/nonexistent"))
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in TARGETS:
                module.weight.mul_(WEIGHT_SIZE / module.weight.abs().mean())
    return model.to(torch.bfloat16)


def adapter_state(model: torch.nn.Module, delta_std: float) -> dict[str, torch.Tensor]:
    """A peft-layout adapter (what `adapter_model.safetensors` holds) whose scale * B @ A has std `delta_std`."""
    generator = torch.Generator().manual_seed(1)
    factor_std = (delta_std / (SCALE * RANK ** 0.5)) ** 0.5
    state = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in TARGETS:
            out_features, in_features = module.weight.shape
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn((RANK, in_features), generator=generator) * factor_std
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn((out_features, RANK), generator=generator) * factor_std
    return state


def naive_merge(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The engine's merge before issue 16: W_bf16 += bf16(scale * B @ A), in place."""
    merged = copy.deepcopy(model)
    for path, (lora_a, lora_b) in adapted_layers(state).items():
        merged.get_submodule(path).weight.data += lora_delta(lora_a, lora_b, SCALE).to(torch.bfloat16)
    return merged


def exact_merge(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    merged = copy.deepcopy(model)
    assert merge_lora(merged, state, SCALE) == len(adapted_layers(state))
    return merged


def trained_policy_fp32(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The bf16 base's weights plus the delta, all in fp32: the trainer's policy with no rounding anywhere."""
    policy = copy.deepcopy(model).float()
    merge_lora(policy, state, SCALE)
    return policy


def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, 49152, (4, 64), generator=generator)
    return input_ids, torch.roll(input_ids, -1, dims=1)


@torch.no_grad()
def logprobs(model: torch.nn.Module) -> torch.Tensor:
    input_ids, targets = tokens()
    return causal_lm_token_logprobs(model, input_ids, targets)


def shift_recovered(candidate: torch.Tensor, base: torch.Tensor, policy: torch.Tensor) -> float:
    """How much of the trained shift (policy - base) a candidate's logprobs show: 1 = all of it, 0 = none."""
    shift = policy - base
    return float(((candidate - base) * shift).sum() / (shift * shift).sum())


def test_naive_bf16_merge_drops_a_large_share_of_delta_entries_and_the_exact_merge_drops_none():
    base = bf16_base()
    state = adapter_state(base, DELTA_STD)
    naive, exact = naive_merge(base, state), exact_merge(base, state)
    dropped = total = 0
    for path, (lora_a, lora_b) in adapted_layers(state).items():
        intended = base.get_submodule(path).weight.float() + lora_delta(lora_a, lora_b, SCALE)
        unchanged = naive.get_submodule(path).weight == base.get_submodule(path).weight
        dropped += int(unchanged.sum())
        total += unchanged.numel()
        merged_layer = exact.get_submodule(path)
        assert isinstance(merged_layer, SplitPrecisionLinear) and merged_layer.high.dtype == torch.bfloat16
        # high + low holds the fp32 merge to ~2^-16 relative: far below the delta's 1e-4.
        assert float((merged_layer.weight - intended).abs().max()) < 1e-6
    # Measured: 0.53 of the delta entries vanish in the in-place bf16 merge (those under half a bf16 spacing:
    # 6e-5 for weights in [0.016, 0.031), 1.2e-4 in [0.031, 0.063)).
    assert 0.4 < dropped / total < 0.65


def test_exact_merge_weights_give_the_trained_policys_logprobs_and_naive_ones_do_not():
    """Compute in fp32 on the merged weights, so only what the merge stored differs between the candidates."""
    base = bf16_base()
    state = adapter_state(base, DELTA_STD)
    base_lp = logprobs(copy.deepcopy(base).float())
    policy_lp = logprobs(trained_policy_fp32(base, state))
    exact_lp = logprobs(exact_merge(base, state).float())
    naive_lp = logprobs(naive_merge(base, state).float())
    shift = float((policy_lp - base_lp).abs().mean())
    assert shift > 1e-4  # the delta changes the policy measurably

    exact_error = float((exact_lp - policy_lp).abs().mean())
    naive_error = float((naive_lp - policy_lp).abs().mean())
    # Measured: the exact merge's error is 8e-4 of the shift; the naive merge's 0.41 of it.
    assert exact_error < 0.01 * shift
    assert naive_error > 0.2 * shift
    assert abs(shift_recovered(exact_lp, base_lp, policy_lp) - 1) < 0.01


def test_bf16_sampler_matches_the_bf16_trainer_and_differs_from_the_base():
    """All in bf16 as on CUDA: merged sampler vs the trainer's peft forward vs the untouched base."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    base = bf16_base()
    state = adapter_state(base, DELTA_STD)
    config = LoraConfig(r=RANK, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    trainer = get_peft_model(copy.deepcopy(base), config).eval()
    set_peft_model_state_dict(trainer, {key: value.to(torch.bfloat16) for key, value in state.items()})

    base_fp32_lp = logprobs(copy.deepcopy(base).float())
    policy_lp = logprobs(trained_policy_fp32(base, state))
    sampler_lp = logprobs(exact_merge(base, state))
    trainer_lp = logprobs(trainer)
    base_lp = logprobs(base)

    # bf16 activations put ~1e-3 of noise on each logprob, for the trainer and the sampler alike.
    torch.testing.assert_close(sampler_lp, trainer_lp, rtol=0, atol=1e-2)
    # Over 256 tokens that noise averages out: the sampler shows the trained shift, the base shows none of it
    # (measured: 0.86 and 0.05 of it).
    assert abs(shift_recovered(sampler_lp, base_fp32_lp, policy_lp) - 1) < 0.25
    assert abs(shift_recovered(trainer_lp, base_fp32_lp, policy_lp) - 1) < 0.25
    assert abs(shift_recovered(base_lp, base_fp32_lp, policy_lp)) < 0.25


def test_fp32_layers_merge_in_place_and_masters_override_the_layers_own_weights():
    fp32 = store.load_model(models.TINY, cache_dir=Path("/nonexistent"))
    state = adapter_state(fp32, DELTA_STD)
    masters = fp32_masters(fp32, state)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)

    in_place = copy.deepcopy(fp32)
    merge_lora(in_place, state, SCALE)
    from_masters = copy.deepcopy(bf16)
    merge_lora(from_masters, state, SCALE, masters=masters)
    for path, (lora_a, lora_b) in adapted_layers(state).items():
        intended = fp32.get_submodule(path).weight + lora_delta(lora_a, lora_b, SCALE)
        assert type(in_place.get_submodule(path)) is torch.nn.Linear
        assert torch.equal(in_place.get_submodule(path).weight, intended)
        # A bf16 copy merged from fp32 masters carries the fp32 base, not its bf16 rounding.
        assert float((from_masters.get_submodule(path).weight - intended).abs().max()) < 1e-6
