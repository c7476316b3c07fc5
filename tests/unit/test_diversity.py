"""Diversity metrics on hand-made sample sets with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_core import diversity
from dpo_core.data import EvalPrompt
from dpo_core.evaluate import EvalOverlapError, aggregate, bucket_of, check_no_overlap, select_prompts
from dpo_core.config import EvalConfig

SAME = ["the cat sat on the mat"] * 4
DISTINCT = ["red apples fall slowly", "seven bright stars shine", "quiet rivers bend north", "old ships sail home"]


def test_distinct_n_known_values():
    assert diversity.distinct_n(SAME, 1) == pytest.approx(5 / 24)  # 5 unique words of 24
    assert diversity.distinct_n(SAME, 2) == pytest.approx(5 / 20)
    assert diversity.distinct_n(DISTINCT, 1) == 1.0 and diversity.distinct_n(DISTINCT, 2) == 1.0
    assert diversity.distinct_n(["one"], 2) == 0.0


def test_identical_samples_are_least_diverse_on_every_metric():
    assert diversity.self_bleu(SAME) == pytest.approx(1.0)
    assert diversity.self_bleu(DISTINCT) == pytest.approx(0.0, abs=1e-9)
    assert diversity.compression_ratio(SAME) > diversity.compression_ratio(DISTINCT)
    same_vectors = np.tile([[1.0, 2.0, 3.0]], (4, 1))
    orthogonal = np.eye(4)
    assert diversity.embedding_distance(same_vectors) == pytest.approx(0.0, abs=1e-12)
    assert diversity.embedding_distance(orthogonal) == pytest.approx(1.0)
    assert diversity.vendi_score(same_vectors) == pytest.approx(1.0)
    assert diversity.vendi_score(orthogonal) == pytest.approx(4.0)


def test_vendi_lies_between_one_and_k():
    rng = np.random.default_rng(0)
    for k in (2, 5, 8):
        score = diversity.vendi_score(rng.normal(size=(k, 16)))
        assert 1.0 <= score <= k + 1e-9


def test_score_samples_with_real_embeddings():
    embedder = diversity.Embedder()
    vectors = embedder.encode(["A dog runs in the park.", "A puppy is running in a park.", "Stock markets fell today."])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.6 > similarity[0, 2]  # paraphrases are close, unrelated text is far
    scores = diversity.score_samples(DISTINCT, embedder.encode(DISTINCT), [4, 4, 4, 4])
    same = diversity.score_samples(SAME, embedder.encode(SAME), [6, 6, 6, 6])
    for metric, higher in diversity.HIGHER_IS_MORE_DIVERSE.items():
        assert (scores[metric] > same[metric]) == higher, metric
    assert same["vendi"] == pytest.approx(1.0, abs=1e-3) and scores["mean_tokens"] == 4


def _prompts():
    return [EvalPrompt(f"p{i}", f"prompt {i}", c) for i, c in enumerate([0.0, 0.1, 0.5, 0.6, 0.9, 1.0])]


def test_buckets_and_stratified_selection():
    config = EvalConfig(max_prompts=3)
    assert [bucket_of(c, config.bucket_edges) for c in (0.0, 0.34, 0.66, 0.67, 1.0)] == \
        ["low", "mid", "mid", "high", "high"]
    chosen = select_prompts(_prompts(), config)
    assert sorted(bucket_of(p.creativity_score, config.bucket_edges) for p in chosen) == ["high", "low", "mid"]


def test_overlap_with_training_prompts_is_an_error():
    with pytest.raises(EvalOverlapError, match="p2"):
        check_no_overlap(_prompts(), {"Prompt  2"}, "train.parquet")
    check_no_overlap(_prompts(), {"something else"}, "train.parquet")


def test_aggregate_means_and_bootstrap_ci():
    import pandas as pd

    table = pd.DataFrame({"bucket": ["low", "low", "high", "high"], "distinct_1": [0.2, 0.4, 0.8, 1.0]})
    result = aggregate(table, EvalConfig(bootstrap=200))
    assert result["overall"]["distinct_1"]["mean"] == pytest.approx(0.6)
    assert result["buckets"]["low"]["distinct_1"]["mean"] == pytest.approx(0.3)
    low = result["buckets"]["low"]["distinct_1"]
    assert 0.2 <= low["ci_low"] <= low["mean"] <= low["ci_high"] <= 0.4
    assert "mid" not in result["buckets"]
