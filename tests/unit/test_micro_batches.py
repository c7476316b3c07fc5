"""Issue 27: training micro-batches are bucketed by length, so little of a forward is spent on padding."""

from __future__ import annotations

from dpo_core.local.trainer import micro_batches


def test_micro_batches_group_similar_lengths_within_the_budget():
    lengths = [200, 20, 190, 25, 180, 30, 170, 35]  # a DPO batch: long chosen, short rejected, alternating
    groups = micro_batches(lengths, 400)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))  # each sequence once
    for group in groups:
        assert max(lengths[i] for i in group) * len(group) <= 400
    padded = sum(max(lengths[i] for i in group) * len(group) for group in groups)
    assert padded <= 1.15 * sum(lengths)  # in arrival order: 200 x 2 + 190 x 2 + ... = 1.7x the real tokens


def test_micro_batches_are_a_function_of_the_lengths_alone():
    """The forward-only pass and the backward after it must group the same sequences together."""
    lengths = [50, 60, 50, 70, 10]
    assert micro_batches(lengths, 128) == micro_batches(list(lengths), 128)
    assert micro_batches(lengths, 128)[0] == [3]  # longest first, alone: 2 x 70 > 128
    assert micro_batches([300], 128) == [[0]]  # one longer than the budget still runs, alone
