"""Pair selection rules on hand-made pools with known answers (ties, all-identical pools, NaN scores)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpo_core.judge import parse_rating, rating_from_distribution
from dpo_core.pairs import mean_distances, select_by_quality, select_by_score

NAN = math.nan


def test_divpo_rule_picks_most_diverse_good_and_least_diverse_bad():
    quality = [0.9, 0.8, 0.2, 0.1]
    diversity = [0.1, 0.7, 0.9, 0.3]
    # top half by quality: {0, 1} -> most diverse is 1; bottom half: {2, 3} -> least diverse is 3
    assert select_by_score(quality, diversity, rho=0.5) == (1, 3)
    # rho = 1: everyone is in both halves: chosen = most diverse overall, rejected = least diverse overall
    assert select_by_score(quality, diversity, rho=1.0) == (2, 0)


def test_ties_break_toward_quality_then_index():
    quality = [0.5, 0.9, 0.9, 0.1]
    same = [0.4, 0.4, 0.4, 0.4]
    chosen, rejected = select_by_score(quality, same, rho=0.5)
    assert chosen == 1  # tie on score: better quality, then the lower index
    assert rejected == 3  # tie on score: worse quality
    assert select_by_quality([0.3, 0.9, 0.9, 0.1, 0.1]) == (1, 3)


def test_all_identical_pools_yield_no_quality_pair():
    assert select_by_quality([0.5, 0.5, 0.5]) is None
    assert select_by_quality([0.5]) is None


def test_nan_scores_take_no_part():
    assert select_by_score([0.9, 0.8, 0.1], [NAN, 0.5, 0.2], rho=0.5) == (1, 2)
    assert select_by_score([0.9, NAN], [0.1, 0.2], rho=0.5) is None
    assert select_by_quality([NAN, 0.2, 0.7]) == (2, 1)


def test_mean_distances():
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert mean_distances(vectors) == pytest.approx([0.5, 0.5, 1.0])


@pytest.mark.parametrize("reply, rating", [
    ("7", 7.0), ("Rating: 9/10", 9.0), ("I would say 10.", 10.0), ("0 or maybe 3", 3.0), ("no idea", None),
    ("42", None),
])
def test_parse_rating(reply, rating):
    assert parse_rating(reply) == rating


def test_rating_from_distribution_splits_one_between_1_and_10():
    # P(first token): "1" 0.5, "7" 0.3, " 9" 0.1 (a spaced digit still counts), "The" 0.1; P("0" | "1") = 0.6
    first = {"1": 0.5, "7": 0.3, " 9": 0.1, "The": 0.1}
    rating, mass = rating_from_distribution(first, zero_after_one=0.6, min_mass=0.5)
    # ratings: 1 -> 0.2, 10 -> 0.3, 7 -> 0.3, 9 -> 0.1 (mass 0.9)
    assert mass == pytest.approx(0.9)
    assert rating == pytest.approx((1 * 0.2 + 10 * 0.3 + 7 * 0.3 + 9 * 0.1) / 0.9)


def test_rating_from_distribution_refuses_a_judge_that_is_not_rating():
    rating, mass = rating_from_distribution({"The": 0.7, "5": 0.1, "0": 0.05, "07": 0.05, "²": 0.1}, 0.0,
                                           min_mass=0.5)
    assert rating is None and mass == pytest.approx(0.1)  # "0", "07" and "²" are not ratings 1-10
    assert rating_from_distribution({"5": 1.0}, 0.9, min_mass=0.5) == (5.0, 1.0)
    assert rating_from_distribution({}, 0.0, min_mass=0.1) == (None, 0.0)


def test_length_balanced_selection_skips_rejected_candidates_too_far_in_length():
    from dpo_core.pairs import select_length_balanced

    quality = [0.9, 0.5, 0.1]
    words = [10, 12, 40]  # the worst candidate is 4x longer than the best
    assert select_length_balanced(select_by_quality, quality, words, None) == (0, 2)
    assert select_length_balanced(select_by_quality, quality, words, 1.5) == (0, 1)
    assert select_length_balanced(select_by_quality, [0.9, 0.1], [10, 40], 1.5) is None


def test_truncated_candidates_are_excluded_and_counted_and_length_gaps_reported():
    from dpo_core.pairs import PairsConfig, build_datasets

    pool = [{"text": "a b c d", "tokens": [1] * 4}, {"text": "e f", "tokens": [1] * 2},
            {"text": "g h i j k l m n", "tokens": [1] * 8}]  # the third stopped at max_tokens = 8
    prompts = [{"prompt_id": "p0", "prompt": "write", "creativity_score": 0.5}]
    vectors = {"p0": np.eye(3)}
    config = PairsConfig(prompts="unused", max_tokens=8)
    tables, summary = build_datasets(prompts, {"p0": pool}, {"p0": [0.1, 0.5, 0.9]}, {"p0": [5.0, 6.0, 7.0]},
                                     vectors, config)
    assert tables[2].iloc[0]["chosen"] == "e f" and tables[2].iloc[0]["rejected"] == "a b c d"
    assert summary["truncated_candidates"] == {"count": 1, "excluded": True, "max_tokens": 8}
    assert summary["per_dataset"][2]["length_gap_words_mean"] == -2.0
    kept, flagged = build_datasets(prompts, {"p0": pool}, {"p0": [0.1, 0.5, 0.9]}, {"p0": [5.0, 6.0, 7.0]},
                                   vectors, config.model_copy(update={"exclude_truncated": False}))
    assert kept[2].iloc[0]["chosen_truncated"] and flagged["per_dataset"][2]["pairs_with_truncated_text"] == 1
