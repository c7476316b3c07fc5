"""Quality-aware diversity (NoveltyBench distinct_k / utility_k, effective diversity) with known answers, and a
random-token model that raw metrics call diverse and the quality-aware ones do not."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_core import diversity, novelty

# Unit vectors in sample order: samples 0 and 2 are the same answer (cos 0.8 >= 0.75), 1 and 3 are new.
E = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])


def test_partition_is_greedy_in_sample_order_against_each_class_first_member():
    assert novelty.partition(E, 0.75).tolist() == [0, 1, 0, 2]
    assert novelty.partition(E, 0.81).tolist() == [0, 1, 2, 3]  # 0.8 < 0.81: sample 2 starts its own class
    # cos(a, b) = 0.8 and cos(b, c) = 0.8 but cos(a, c) = 0.28: c is compared with the class's FIRST member only.
    chain = np.array([[1.0, 0.0], [0.8, 0.6], [0.28, 0.96]])
    assert novelty.partition(chain, 0.75).tolist() == [0, 0, 1]
    assert novelty.partition(E, 0.75, members=[True, False, True, True]).tolist() == [0, -1, 0, 1]


def test_distinct_k_counts_classes_of_valid_samples():
    assert novelty.distinct_k([0, 1, 0, 2]) == 3
    assert novelty.distinct_k([0, 0, 0, 0]) == 1
    assert novelty.distinct_k([-1, -1]) == 0


def test_utility_k_known_values():
    weights = 0.8 ** np.arange(4)  # 1, 0.8, 0.64, 0.512: sum 2.952
    # All distinct and valid: 1. The duplicate (sample 2) earns nothing.
    assert novelty.utility_k([0, 1, 2, 3], [1, 1, 1, 1]) == pytest.approx(1.0)
    assert novelty.utility_k([0, 1, 0, 2], [1, 1, 1, 1]) == pytest.approx((1 + 0.8 + 0.512) / weights.sum())
    # Quality weighs what a new class earns; a class with no valid member earns 0.
    assert novelty.utility_k([0, 1, 2, 3], [0.5, 1, 0, 1]) == pytest.approx((0.5 + 0.8 + 0.512) / weights.sum())
    assert novelty.utility_k([-1, -1, 0, 0], [0, 0, 1, 1]) == pytest.approx(0.64 / weights.sum())
    # Patience 1: plain mean over samples of (novel x quality).
    assert novelty.utility_k([0, 0, 1, 1], [1, 1, 1, 1], patience=1.0) == pytest.approx(0.5)


def test_effective_diversity_counts_only_valid_samples():
    orthogonal = np.eye(4)
    everyone = np.ones(4, dtype=bool)
    assert novelty.effective_embedding_distance(orthogonal, everyone) == pytest.approx(1.0)
    # Two valid samples: one pair of distance 1 out of 6 pairs. Excluding instead of zero-weighting would say 1.
    assert novelty.effective_embedding_distance(orthogonal, [True, True, False, False]) == pytest.approx(1 / 6)
    assert novelty.effective_embedding_distance(orthogonal, np.zeros(4, bool)) == 0.0
    assert novelty.effective_vendi(orthogonal, everyone) == pytest.approx(4.0)
    assert novelty.effective_vendi(orthogonal, [True, False, True, False]) == pytest.approx(2.0)
    assert novelty.effective_vendi(orthogonal, np.zeros(4, bool)) == 0.0


def test_validity_floor_truncation_and_judge():
    valid = novelty.validity([-2.0, -4.5, -4.6, np.nan, -1.0], ["stop", "stop", "stop", "stop", "length"])
    assert valid.tolist() == [True, True, False, False, False]
    kept = novelty.validity([-1.0], ["length"], truncated_is_invalid=False)
    assert kept.tolist() == [True]
    judged = novelty.validity([-1.0, -1.0], ["stop", "stop"], judge_ratings=[7.0, 3.0], judge_floor=5.0)
    assert judged.tolist() == [True, False]


def test_random_tokens_score_high_on_raw_distinct_n_and_low_on_quality_aware_metrics():
    """A model that emits random tokens: every n-gram is new and every embedding points elsewhere, so the raw
    metrics call it maximally diverse; its fluency is far under the floor, so the quality-aware metrics are 0.
    A coherent model that gives 2 distinct valid answers out of 4 scores above it on every quality-aware one."""
    rng = np.random.default_rng(0)
    vocabulary = [f"tok{i}" for i in range(50_000)]
    noise = [" ".join(rng.choice(vocabulary, size=40)) for _ in range(4)]
    noise_vectors = rng.normal(size=(4, 384))
    noise_logprob = [np.log(1 / 50_000)] * 4  # uniform over a 50k vocabulary: -10.8 per token
    coherent = ["the cat sat on the mat", "the cat sat on the mat", "a dog ran in the park", "a dog ran in the park"]
    coherent_vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    coherent_logprob = [-2.0] * 4

    assert diversity.distinct_n(noise, 1) > 0.95 and diversity.distinct_n(noise, 2) == 1.0
    assert diversity.distinct_n(noise, 2) > diversity.distinct_n(coherent, 2)
    assert diversity.embedding_distance(noise_vectors) > diversity.embedding_distance(coherent_vectors)

    noise_scores = novelty.score_quality_aware(noise_vectors, novelty.validity(noise_logprob, ["stop"] * 4))
    coherent_scores = novelty.score_quality_aware(coherent_vectors, novelty.validity(coherent_logprob, ["stop"] * 4))
    assert noise_scores == {"utility_k": 0.0, "distinct_k": 0.0, "effective_embedding_distance": 0.0,
                            "effective_vendi": 0.0, "valid_rate": 0.0}
    assert coherent_scores["distinct_k"] == 2.0 and coherent_scores["valid_rate"] == 1.0
    assert coherent_scores["utility_k"] == pytest.approx((1 + 0.64) / (1 + 0.8 + 0.64 + 0.512))
    assert coherent_scores["effective_vendi"] == pytest.approx(2.0)
    for metric in novelty.QUALITY_AWARE_METRICS:
        assert coherent_scores[metric] > noise_scores[metric], metric
