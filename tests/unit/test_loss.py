"""The sigmoid DPO loss as a pure function: ln 2 at equal ratios; equal to the cookbook's and TRL's."""

from __future__ import annotations

import math

import pytest

from dpo_core.loss import dpo_loss


def test_loss_is_ln2_at_equal_ratios_and_matches_the_cookbook():
    import torch
    from tinker_cookbook.preference.train_dpo import compute_dpo_loss

    zeros = torch.zeros(3)
    loss, metrics = dpo_loss(zeros - 5, zeros - 7, zeros - 5, zeros - 7, beta=0.1)
    assert float(loss) == pytest.approx(math.log(2)) and metrics["margin"] == 0
    chosen, rejected = torch.tensor([-10.0, -4.0, -8.0]), torch.tensor([-12.0, -3.0, -9.5])
    ref_c, ref_r = torch.tensor([-11.0, -4.5, -8.0]), torch.tensor([-11.0, -3.2, -9.0])
    loss, metrics = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.2)
    expected, cookbook = compute_dpo_loss(list(chosen), list(rejected), list(ref_c), list(ref_r), 0.2)
    assert float(loss) == pytest.approx(float(expected))
    for key in ("accuracy", "margin", "chosen_reward", "rejected_reward"):
        assert metrics[key] == pytest.approx(cookbook[key])
    # TRL's sigmoid loss: -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged.
    logits = (chosen - ref_c) - (rejected - ref_r)
    assert float(loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(0.2 * logits).mean()))


# Hand-computed values for one pair: policy (c, r) = (-10, -12), reference (-11, -11), so the summed log-ratios are
# +1 and -1 and h = 2; responses of 4 (chosen) and 2 (rejected) tokens, so the per-token ratios are 0.25 and -0.5
# and h̄ = 0.75. beta = 0.5.
def _one_pair(**kwargs):
    import torch

    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), 0.5, tokens_chosen=t(4.0), tokens_rejected=t(2.0),
                    **kwargs)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss_type, smoothing, expected", [
    ("sigmoid", 0.0, -_log_sigmoid(1.0)),  # βh = 1: ln(1 + e^-1) = 0.31326
    ("sigmoid", 0.1, -0.9 * _log_sigmoid(1.0) - 0.1 * _log_sigmoid(-1.0)),  # cDPO: 0.41326
    ("robust", 0.1, (-0.9 * _log_sigmoid(1.0) + 0.1 * _log_sigmoid(-1.0)) / 0.8),  # 0.18826
    ("ipo", 0.0, (0.75 - 1 / (2 * 0.5)) ** 2),  # (h̄ - 1/2β)² = 0.0625
    ("sigmoid_norm", 0.0, -_log_sigmoid(0.5 * 0.75)),  # βh̄ = 0.375: 0.52312
])
def test_each_loss_type_matches_its_hand_computed_value(loss_type, smoothing, expected):
    loss, metrics = _one_pair(loss_type=loss_type, label_smoothing=smoothing)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert metrics["dpo_loss"] == metrics["loss"] == pytest.approx(expected, rel=1e-12)
    # Rewards and margin are beta x the SUMMED log-ratios for every type, so runs of different types compare.
    assert metrics["margin"] == pytest.approx(1.0) and metrics["accuracy"] == 1.0
    if loss_type in ("ipo", "sigmoid_norm"):
        assert metrics["margin_norm"] == pytest.approx(0.375)


def test_hand_values_are_the_numbers_written_down():
    # Guards the helper above: the same values as decimals, computed on paper.
    assert -_log_sigmoid(1.0) == pytest.approx(0.313262, abs=1e-6)
    assert (-0.9 * _log_sigmoid(1.0) + 0.1 * _log_sigmoid(-1.0)) / 0.8 == pytest.approx(0.188262, abs=1e-6)
    assert -0.9 * _log_sigmoid(1.0) - 0.1 * _log_sigmoid(-1.0) == pytest.approx(0.413262, abs=1e-6)
    assert -_log_sigmoid(0.375) == pytest.approx(0.523123, abs=1e-6)


def test_nll_weight_adds_the_chosen_responses_per_token_nll():
    loss, metrics = _one_pair(nll_weight=0.5)
    # NLL per chosen token: 10 / 4 = 2.5; loss = 0.31326 + 0.5 * 2.5.
    assert metrics["nll_loss"] == pytest.approx(2.5)
    assert float(loss) == pytest.approx(-_log_sigmoid(1.0) + 1.25, rel=1e-12)
    assert metrics["dpo_loss"] == pytest.approx(-_log_sigmoid(1.0))


def test_gradients_flow_through_every_loss_type():
    import torch

    for loss_type in ("sigmoid", "ipo", "robust", "sigmoid_norm"):
        chosen = torch.tensor([-10.0, -8.0], requires_grad=True)
        loss, _ = dpo_loss(chosen, torch.tensor([-12.0, -9.0]), torch.tensor([-11.0, -8.0]),
                           torch.tensor([-11.0, -9.0]), 0.5, loss_type=loss_type, label_smoothing=0.0,
                           nll_weight=0.1, tokens_chosen=torch.tensor([4, 3]), tokens_rejected=torch.tensor([2, 5]))
        loss.backward()
        assert chosen.grad is not None and bool(torch.all(chosen.grad < 0)), loss_type  # raising chosen lowers loss


def test_length_normalised_losses_need_the_lengths():
    import torch

    zeros = torch.zeros(2)
    with pytest.raises(ValueError, match="response lengths"):
        dpo_loss(zeros, zeros, zeros, zeros, 0.1, loss_type="sigmoid_norm")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(zeros, zeros, zeros, zeros, 0.1, loss_type="hinge")
