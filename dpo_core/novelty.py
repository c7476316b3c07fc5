"""Quality-aware diversity over the k samples of one prompt (pure functions, numpy only).

Raw diversity metrics (dpo_core.diversity) score noise as diverse: k strings of random tokens have no repeated
n-gram and point in k directions. The metrics here count only what a reader would call a different answer:

- Validity: a sample is *valid* when it reads as text and ended on its own: its mean token logprob under the
  base model is at least `fluency_floor` and it did not stop at max_tokens (a cut sample is a fragment). At
  temperature 1.0 the 135M judge rates noise and text alike, so the fluency floor, not the judge, is the default
  test; a judge floor can be added (`judge_floor`).
- NoveltyBench (Zhang et al. 2025): the k samples are partitioned into equivalence classes, here greedily in
  sample order by embedding cosine similarity to each class's first member (>= `similarity_threshold` joins
  it). `distinct_k` = the number of classes among the valid samples (an invalid sample starts no class);
  `utility_k` = sum_i p^(i-1) * novel_i * quality_i, normalised by sum_i p^(i-1) (p = patience 0.8), where
  novel_i is 1 for the first member of a class and 0 for a duplicate, and quality_i is 1 for a valid sample and
  0 otherwise. So utility_k lies in 0..1: 1 when all k samples are valid and pairwise distinct.
- Effective semantic diversity (Shypula et al. 2025): `effective_embedding_distance` is the sum of cosine
  distances over pairs of valid samples divided by the number of ALL pairs (an invalid sample adds nothing,
  and fewer valid samples cannot look more diverse); `effective_vendi` is the Vendi score of the valid samples
  only (0 when none is valid), the effective number of distinct valid answers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from dpo_core.diversity import _normalise, vendi_score

DEFAULT_FLUENCY_FLOOR = -4.5
DEFAULT_SIMILARITY_THRESHOLD = 0.75
DEFAULT_PATIENCE = 0.8
TRUNCATED = "length"  # the sampler's stop_reason for a sample cut at max_tokens

QUALITY_AWARE_METRICS = ("utility_k", "distinct_k", "effective_embedding_distance", "effective_vendi",
                         "valid_rate")
# valid_rate is quality, not diversity, but "more valid" reads the same way: higher is better for all of them.
HIGHER_IS_BETTER = dict.fromkeys(QUALITY_AWARE_METRICS, True)


def validity(mean_logprobs: Sequence[float], stop_reasons: Sequence[str] | None = None,
             fluency_floor: float = DEFAULT_FLUENCY_FLOOR, judge_ratings: Sequence[float] | None = None,
             judge_floor: float | None = None, truncated_is_invalid: bool = True) -> np.ndarray:
    """Boolean per sample: fluent enough (NaN logprob = not), not cut at max_tokens, and over the judge floor."""
    logprobs = np.asarray(mean_logprobs, dtype=np.float64)
    valid = ~np.isnan(logprobs) & (np.nan_to_num(logprobs, nan=-np.inf) >= fluency_floor)
    if truncated_is_invalid and stop_reasons is not None:
        valid &= np.asarray([reason != TRUNCATED for reason in stop_reasons], dtype=bool)
    if judge_floor is not None and judge_ratings is not None:
        ratings = np.nan_to_num(np.asarray(judge_ratings, dtype=np.float64), nan=-np.inf)
        valid &= ratings >= judge_floor
    return valid


def partition(embeddings: np.ndarray, threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
              members: Sequence[bool] | np.ndarray | None = None) -> np.ndarray:
    """Class id per sample, greedily in sample order: a sample joins the first class whose first member it is at
    least `threshold` cosine-similar to, else starts a new class. Samples outside `members` get class -1."""
    unit = _normalise(embeddings)
    k = len(unit)
    members = np.ones(k, dtype=bool) if members is None else np.asarray(members, dtype=bool)
    classes = np.full(k, -1, dtype=int)
    representatives: list[int] = []
    for i in range(k):
        if not members[i]:
            continue
        for class_id, first in enumerate(representatives):
            if float(unit[i] @ unit[first]) >= threshold:
                classes[i] = class_id
                break
        else:
            classes[i] = len(representatives)
            representatives.append(i)
    return classes


def distinct_k(classes: Sequence[int] | np.ndarray) -> int:
    """Number of equivalence classes (class -1, the invalid samples, is none)."""
    return len({int(c) for c in classes if c >= 0})


def utility_k(classes: Sequence[int] | np.ndarray, quality: Sequence[float] | np.ndarray,
              patience: float = DEFAULT_PATIENCE) -> float:
    """NoveltyBench's patience-weighted utility, normalised to the quality scale: first members of a class earn
    their quality, duplicates (and samples without a class) earn 0."""
    classes = np.asarray(classes)
    quality = np.asarray(quality, dtype=np.float64)
    if classes.size == 0:
        return 0.0
    weights = patience ** np.arange(classes.size)
    seen: set[int] = set()
    earned = np.zeros(classes.size)
    for i, class_id in enumerate(classes):
        if class_id >= 0 and int(class_id) not in seen:
            seen.add(int(class_id))
            earned[i] = quality[i]
    return float((weights * earned).sum() / weights.sum())


def effective_embedding_distance(embeddings: np.ndarray, valid: Sequence[bool] | np.ndarray) -> float:
    """Sum of cosine distances over pairs of valid samples / number of all pairs (invalid samples add 0)."""
    unit = _normalise(embeddings)
    valid = np.asarray(valid, dtype=bool)
    k = len(unit)
    if k < 2:
        return 0.0
    similarity = unit @ unit.T
    total = sum(1.0 - similarity[i, j] for i, j in itertools.combinations(range(k), 2) if valid[i] and valid[j])
    return float(total / (k * (k - 1) / 2))


def effective_vendi(embeddings: np.ndarray, valid: Sequence[bool] | np.ndarray) -> float:
    """Vendi score of the valid samples only (0 when none is valid)."""
    valid = np.asarray(valid, dtype=bool)
    return vendi_score(np.asarray(embeddings)[valid]) if valid.any() else 0.0


def score_quality_aware(embeddings: np.ndarray, valid: Sequence[bool] | np.ndarray,
                        similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
                        patience: float = DEFAULT_PATIENCE) -> dict[str, float]:
    """Every quality-aware metric for one prompt's samples (embeddings in sample order)."""
    valid = np.asarray(valid, dtype=bool)
    classes = partition(embeddings, similarity_threshold, members=valid)
    return {"utility_k": utility_k(classes, valid.astype(float), patience),
            "distinct_k": float(distinct_k(classes)),
            "effective_embedding_distance": effective_embedding_distance(embeddings, valid),
            "effective_vendi": effective_vendi(embeddings, valid),
            "valid_rate": float(valid.mean()) if valid.size else float("nan")}
