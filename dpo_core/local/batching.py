"""Grouping sequences of different lengths into padded batches: the one rule training and prefill share."""

from __future__ import annotations


def length_buckets(lengths: list[int], budget_tokens: int, max_padding: float = float("inf")) -> list[list[int]]:
    """Group indices so each group's padded size (longest x count) stays under `budget_tokens` and, when given,
    within `1 + max_padding` times its real tokens.

    Longest first, each group holds sequences of similar length, so the padding a forward computes for nothing
    stays small. A pure function of the lengths (ties keep index order): the same lengths always group alike.
    A sequence longer than the budget still gets a group of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in order:
        if current:
            padded = lengths[current[0]] * (len(current) + 1)
            if padded > budget_tokens or padded > (1 + max_padding) * (real + lengths[index]):
                groups.append(current)
                current, real = [], 0
        current.append(index)
        real += lengths[index]
    if current:
        groups.append(current)
    return groups
