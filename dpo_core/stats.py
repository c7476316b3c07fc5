"""Paired statistics for model comparisons (pure functions, numpy only).

Every model answers the same eval prompts with the same sampling seeds, so the unit of comparison is the
per-prompt difference `model - reference`: prompt difficulty cancels out, which makes a paired test far more
sensitive than comparing two unpaired confidence intervals. Three pieces:
- `paired_bootstrap_ci`: percentile bootstrap CI of the mean difference (prompts resampled with replacement).
- `sign_flip_permutation_p`: two-sided p-value for "mean difference = 0". Under the null each difference is as
  likely positive as negative, so flipping signs at random draws from the null distribution of the mean.
- `holm`: Holm's step-down adjustment, for when several metrics x buckets are tested at once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_BOOTSTRAP_ROUNDS = 2000
DEFAULT_PERMUTATION_ROUNDS = 10_000
EXACT_SIGN_FLIP_MAX_N = 16  # 2**16 sign patterns: exact enumeration is still cheap, and exact beats sampling
# Means that agree to this tolerance count as "at least as extreme": floating-point noise in the flipped sums
# must not turn a tie (for instance all-zero differences) into a miss.
_TIE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class PairedResult:
    """Summary of one paired comparison over prompts; `difference` is mean(model - reference)."""

    num_pairs: int
    mean_model: float
    mean_reference: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float


def _clean(differences: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(differences, dtype=np.float64).ravel()
    return values[~np.isnan(values)]


def paired_bootstrap_ci(differences: Sequence[float] | np.ndarray, rounds: int = DEFAULT_BOOTSTRAP_ROUNDS,
                        confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-prompt differences (NaNs dropped; NaN CI when none remain)."""
    values = _clean(differences)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(rounds, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    return float(np.percentile(means, tail)), float(np.percentile(means, 100.0 - tail))


def sign_flip_permutation_p(differences: Sequence[float] | np.ndarray, rounds: int = DEFAULT_PERMUTATION_ROUNDS,
                            seed: int = 0, exact_max_n: int = EXACT_SIGN_FLIP_MAX_N) -> float:
    """Two-sided sign-flip permutation p-value for mean difference 0: exact when n <= exact_max_n, else sampled."""
    values = _clean(differences)
    n = values.size
    if n == 0:
        return float("nan")
    observed = abs(values.mean())
    if n <= exact_max_n:
        flipped_means = np.abs(_all_sign_patterns(n) @ values) / n
        return float(np.mean(flipped_means >= observed - _TIE_TOLERANCE))
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(rounds, n))
    extreme = int(np.sum(np.abs((signs * values).mean(axis=1)) >= observed - _TIE_TOLERANCE))
    # The observed labelling counts as one of the permutations, so a sampled p-value is never 0.
    return (extreme + 1) / (rounds + 1)


@functools.lru_cache(maxsize=4)
def _all_sign_patterns(n: int) -> np.ndarray:
    """Every +-1 vector of length n, one per row (2**n rows); cached because a report tests many metrics at one n."""
    bits = (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1
    patterns = (1 - 2 * bits).astype(np.float64)
    patterns.flags.writeable = False
    return patterns


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values, in the input order; NaNs stay NaN and do not count as tests."""
    p = np.asarray(p_values, dtype=np.float64).ravel()
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = tested.size
    if m == 0:
        return adjusted
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    # Step-down: an adjusted p-value can never be smaller than the one of a more significant test.
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def paired_compare(model_values: Sequence[float] | np.ndarray, reference_values: Sequence[float] | np.ndarray,
                   bootstrap_rounds: int = DEFAULT_BOOTSTRAP_ROUNDS,
                   permutation_rounds: int = DEFAULT_PERMUTATION_ROUNDS, seed: int = 0) -> PairedResult:
    """Paired comparison of two aligned per-prompt arrays; prompts with a NaN on either side are dropped."""
    model = np.asarray(model_values, dtype=np.float64).ravel()
    reference = np.asarray(reference_values, dtype=np.float64).ravel()
    if model.shape != reference.shape:
        raise ValueError(f"paired values must align prompt by prompt: {model.size} model vs "
                         f"{reference.size} reference values")
    both = ~(np.isnan(model) | np.isnan(reference))
    model, reference = model[both], reference[both]
    if model.size == 0:
        nan = float("nan")
        return PairedResult(0, nan, nan, nan, nan, nan, nan)
    differences = model - reference
    ci_low, ci_high = paired_bootstrap_ci(differences, bootstrap_rounds, seed=seed)
    return PairedResult(num_pairs=int(model.size), mean_model=float(model.mean()),
                        mean_reference=float(reference.mean()), difference=float(differences.mean()),
                        ci_low=ci_low, ci_high=ci_high,
                        p_value=sign_flip_permutation_p(differences, permutation_rounds, seed=seed))


# ----------------------------------------------------------------------------------------------
# Several training seeds: resample seeds and prompts (a crossed design), test at the seed level
# ----------------------------------------------------------------------------------------------


def two_level_bootstrap_ci(differences_SP: Sequence[Sequence[float]] | np.ndarray,
                           rounds: int = DEFAULT_BOOTSTRAP_ROUNDS, confidence: float = 0.95,
                           seed: int = 0) -> tuple[float, float]:
    """Percentile CI of the mean of a seeds x prompts matrix of paired differences, resampling training seeds
    AND prompts with replacement (independently: every seed answered every prompt). With one seed it is
    `paired_bootstrap_ci` over the prompts (same numbers). NaN cells are left out of each mean."""
    values = np.asarray(differences_SP, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected a seeds x prompts matrix, got shape {values.shape}")
    num_seeds, num_prompts = values.shape
    if num_seeds == 1:
        return paired_bootstrap_ci(values[0], rounds, confidence, seed)
    if num_prompts == 0 or np.isnan(values).all():
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, num_seeds, size=(rounds, num_seeds))
    prompts = rng.integers(0, num_prompts, size=(rounds, num_prompts))
    # values[seeds][:, :, prompts] per round, without building rounds x S x P at once for large P
    import warnings

    with warnings.catch_warnings():  # a resample of only NaN cells has no mean; it is dropped below
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.array([np.nanmean(values[np.ix_(s, p)]) for s, p in zip(seeds, prompts)])
    means = means[~np.isnan(means)]
    tail = (1.0 - confidence) / 2.0 * 100.0
    return float(np.percentile(means, tail)), float(np.percentile(means, 100.0 - tail))


def seed_permutation_p(model_means: Sequence[float] | np.ndarray,
                       reference_means: Sequence[float] | np.ndarray) -> float:
    """Exact two-sided permutation p-value at the seed level, on each training run's mean over prompts.

    One reference run (a base model): sign flips of the per-seed differences (n seeds allow p >= 2 / 2**n).
    Several reference runs (another trained condition): every relabelling of the pooled runs into the two
    groups (3 seeds each allow p >= 0.1). NaN when either side has no run, or one run against one run."""
    model = _clean(model_means)
    reference = _clean(reference_means)
    if model.size == 0 or reference.size == 0 or model.size + reference.size < 3:
        return float("nan")
    if reference.size == 1:
        return sign_flip_permutation_p(model - reference[0])
    import itertools

    pooled = np.concatenate([model, reference])
    observed = abs(model.mean() - reference.mean())
    indices = range(pooled.size)
    extreme = total = 0
    for group in itertools.combinations(indices, model.size):
        mask = np.zeros(pooled.size, dtype=bool)
        mask[list(group)] = True
        total += 1
        extreme += abs(pooled[mask].mean() - pooled[~mask].mean()) >= observed - _TIE_TOLERANCE
    return extreme / total
