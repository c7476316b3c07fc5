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
