"""The held-out split (fixed, seeded, disjoint from training, whole prompts) and held-out DPO metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpo_core.config import ConfigError, TrainConfig, check_step_count
from dpo_core.data import PreferencePair, held_out_split, pair_subset
from dpo_core.train import held_out_metrics


def _pairs(prompts: list[str]) -> list[PreferencePair]:
    def message(text):
        return ({"role": "user", "content": text},)

    return [PreferencePair(prompt=message(p), chosen=({"role": "assistant", "content": "a"},),
                           rejected=({"role": "assistant", "content": "b"},), row=i) for i, p in enumerate(prompts)]


def test_split_is_disjoint_complete_seeded_and_sized():
    pairs = _pairs([f"prompt {i}" for i in range(80)])
    train, held = held_out_split(pairs, 0.1, 8, seed=0)
    assert len(held) == 8 and not set(train) & set(held) and sorted(train + held) == list(range(80))
    assert held_out_split(pairs, 0.1, 8, seed=0) == (train, held)  # fixed for a seed
    assert held_out_split(pairs, 0.1, 8, seed=1)[1] != held
    assert len(held_out_split(pairs, 0.25, 8, seed=0)[1]) == 20  # the fraction wins when larger


def test_split_does_not_depend_on_row_order():
    prompts = [f"prompt {i}" for i in range(40)]
    held = {pairs_prompt for pairs_prompt in (prompts[i] for i in held_out_split(_pairs(prompts), 0.2, 8, 3)[1])}
    reversed_prompts = prompts[::-1]
    held_reversed = {reversed_prompts[i] for i in held_out_split(_pairs(reversed_prompts), 0.2, 8, 3)[1]}
    assert held == held_reversed


def test_pairs_of_one_prompt_stay_on_one_side():
    prompts = [f"prompt {i // 3}" for i in range(60)]  # three pairs per prompt
    train, held = held_out_split(_pairs(prompts), 0.1, 8, seed=0)
    assert len(held) == 9  # 8 rounded up to whole prompts
    assert not {prompts[i] for i in train} & {prompts[i] for i in held}


def test_no_split_when_disabled_or_too_small():
    assert held_out_split(_pairs([f"p{i}" for i in range(80)]), 0.0, 8, 0)[1] == []
    assert held_out_split(_pairs([f"p{i}" for i in range(15)]), 0.1, 8, 0) == (list(range(15)), [])


def test_pair_subset_is_seeded_whole_prompts_in_dataset_order():
    pairs = _pairs([f"prompt {i // 2}" for i in range(100)])  # two pairs per prompt
    subset = pair_subset(pairs, 41, seed=0)
    rows = [p.row for p in subset]
    assert len(rows) == 40 and rows == sorted(rows)  # whole prompts only: 40, not 41
    assert {p.prompt_text() for p in subset} == {pairs[r ^ 1].prompt_text() for r in rows}  # both pairs of each
    assert [p.row for p in pair_subset(pairs, 41, seed=0)] == rows and [p.row for p in pair_subset(pairs, 41, 1)] != rows
    assert pair_subset(pairs, None, 0) == pairs and pair_subset(pairs, 100, 0) == pairs
    # the held-out split is then drawn within the subset
    train, held = held_out_split(subset, 0.2, 8, seed=0)
    assert len(held) == 8 and not set(train) & set(held)


def test_step_count_counts_the_subset_not_the_dataset():
    config = TrainConfig(model_name="m", dataset=1, batch_size=3, max_pairs=40, held_out_fraction=0.2)
    check_step_count(config, 160, "d")  # 40 pairs, 8 held out: 11 steps of 3
    with pytest.raises(ConfigError, match="40 pairs .8 held out. at batch_size=4 .* make 8 optimizer steps"):
        check_step_count(config.model_copy(update={"batch_size": 4}), 160, "d")


def test_held_out_metrics_known_answers():
    reference = np.zeros((4, 2))
    assert held_out_metrics(reference, reference, 0.1)["dpo_loss"] == pytest.approx(math.log(2))
    policy = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # margins 0.1, 0.2, -0.1, 0 (beta 0.1)
    result = held_out_metrics(policy, reference, 0.1)
    # Two wins, one loss, one tie (margin 0) counted half.
    assert result["accuracy"] == 2.5 / 4 and result["ties"] == 1 and result["margin"] == pytest.approx(0.05)
    assert result["margins"] == pytest.approx([0.1, 0.2, -0.1, 0.0]) and result["num_pairs"] == 4
    expected = np.mean([math.log1p(math.exp(-m)) for m in (0.1, 0.2, -0.1, 0.0)])
    assert result["dpo_loss"] == pytest.approx(expected)


def test_margins_within_numeric_noise_are_ties_not_wins():
    """Before training every margin is floating-point noise: it counts half, never as a win."""
    import torch

    from dpo_core.loss import TIE_TOLERANCE, dpo_loss

    reference = np.zeros((6, 2))
    noise = np.array([[1.5e-6, 0.0], [-2e-7, 0.0], [3e-6, 0.0], [1e-6, 0.0], [-1e-6, 0.0], [2e-6, 0.0]])
    result = held_out_metrics(noise, reference, 0.1)
    assert result["accuracy"] == 0.5 and result["ties"] == 6
    policy = torch.tensor(noise)
    _, metrics = dpo_loss(policy[:, 0], policy[:, 1], torch.zeros(6, dtype=torch.float64),
                          torch.zeros(6, dtype=torch.float64), 0.1)
    assert metrics["accuracy"] == 0.5 and metrics["ties"] == 6
    clear = torch.tensor([10 * TIE_TOLERANCE / 0.1] * 2 + [0.0] * 2, dtype=torch.float64)
    _, metrics = dpo_loss(clear, torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                          torch.zeros(4, dtype=torch.float64), 0.1)
    assert metrics["accuracy"] == 0.75 and metrics["ties"] == 2


def test_held_out_loss_is_the_loss_type_preference_term():
    """held_out.jsonl's dpo_loss is the run's loss, as in metrics.jsonl: ipo's is (h̄ - 1/2β)² with h̄ from
    per-token means; sigmoid_norm's -log σ(β h̄)."""
    reference = np.zeros((2, 2))
    policy = np.array([[2.0, 0.0], [0.0, 4.0]])
    tokens = np.array([[4.0, 2.0], [2.0, 8.0]])
    h_norm = np.array([2.0 / 4 - 0.0, 0.0 - 4.0 / 8])  # chosen/len - rejected/len per pair
    ipo = held_out_metrics(policy, reference, 0.5, "ipo", tokens=tokens)
    assert ipo["loss_type"] == "ipo" and ipo["dpo_loss"] == pytest.approx(np.mean((h_norm - 1.0) ** 2))
    norm = held_out_metrics(policy, reference, 0.5, "sigmoid_norm", tokens=tokens)
    assert norm["dpo_loss"] == pytest.approx(np.mean(np.logaddexp(0, -0.5 * h_norm)))
    # accuracy and margins are beta x the summed log-ratios whatever the loss
    assert ipo["margins"] == norm["margins"] == pytest.approx([1.0, -2.0])


def test_the_step_0_check_knows_each_loss_type_at_zero_margin(tmp_path):
    """At zero margin ipo's loss is (1/2β)², the sigmoid family's ln 2: a right reference passes for every type,
    a shifted one is refused."""
    import torch

    from dpo_core.config import TrainConfig
    from dpo_core.loss import dpo_loss
    from dpo_core.service import ServiceIdentity
    from dpo_core.train import ReferenceMismatchError, _check_reference_matches

    service = ServiceIdentity(backend="local", endpoint="local", model_name="m")
    noise = torch.tensor([1e-6, -2e-6, 5e-7, 0.0], dtype=torch.float64)
    zeros, tokens = torch.zeros(4, dtype=torch.float64), torch.full((4,), 20.0, dtype=torch.float64)
    for loss_type in ("sigmoid", "robust", "sigmoid_norm", "ipo"):
        config = TrainConfig(model_name="m", dataset=1, loss_type=loss_type, dpo_beta=0.1,
                             label_smoothing=0.1 if loss_type == "robust" else 0.0)
        _, right = dpo_loss(noise, -noise, zeros, zeros, 0.1, loss_type=loss_type,
                            label_smoothing=config.label_smoothing, tokens_chosen=tokens, tokens_rejected=tokens)
        _check_reference_matches(right, config, service, tmp_path / "ref.npy")
        shifted = torch.full((4,), 0.5, dtype=torch.float64)  # the reference came from other weights
        _, wrong = dpo_loss(noise + shifted, -noise, zeros, zeros, 0.1, loss_type=loss_type,
                            label_smoothing=config.label_smoothing, tokens_chosen=tokens, tokens_rejected=tokens)
        with pytest.raises(ReferenceMismatchError, match=f"{loss_type} DPO loss"):
            _check_reference_matches(wrong, config, service, tmp_path / "ref.npy")
