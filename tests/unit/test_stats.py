"""Paired statistics on hand-made per-prompt values with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_core import stats
from dpo_core.stats import holm, paired_bootstrap_ci, paired_compare, sign_flip_permutation_p


def test_identical_models_give_no_difference_and_p_one():
    scores = np.random.default_rng(0).normal(size=40)
    for n in (10, 40):  # exact enumeration and sampled flips
        result = paired_compare(scores[:n], scores[:n].copy())
        assert result.difference == 0.0
        assert (result.ci_low, result.ci_high) == (0.0, 0.0)
        assert result.p_value == pytest.approx(1.0)


def test_differences_that_cancel_exactly_give_p_one():
    assert sign_flip_permutation_p([1.0, -1.0, 2.0, -2.0, 0.5, -0.5]) == pytest.approx(1.0)


def test_exact_sign_flip_p_matches_hand_count():
    # Of the 8 sign patterns of (1, 2, 3), only all-plus and all-minus reach |mean| >= 2.
    assert sign_flip_permutation_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    # (1, 1, 1, 5): |mean| >= 2 for all-plus / all-minus and for flipping one 1 (sum 6 -> 4 is below 8): 2/16.
    assert sign_flip_permutation_p([1.0, 1.0, 1.0, 5.0]) == pytest.approx(2 / 16)


def test_sampled_sign_flip_p_agrees_with_exact_enumeration():
    differences = np.random.default_rng(1).normal(loc=0.3, size=16)
    exact = sign_flip_permutation_p(differences)
    sampled = sign_flip_permutation_p(differences, rounds=20_000, exact_max_n=0)
    assert sampled == pytest.approx(exact, abs=0.01)


def test_planted_shift_is_found_although_unpaired_intervals_overlap():
    rng = np.random.default_rng(2)
    # Prompt difficulty varies far more than the planted effect: unpaired intervals cannot separate the models.
    reference = rng.normal(scale=1.0, size=24)
    model = reference + 0.3 + rng.normal(scale=0.1, size=24)

    result = paired_compare(model, reference)

    assert result.p_value < 0.001
    assert 0.0 < result.ci_low < 0.3 < result.ci_high
    model_ci = paired_bootstrap_ci(model)  # a one-sample bootstrap of the model's own mean
    reference_ci = paired_bootstrap_ci(reference)
    assert model_ci[0] < reference_ci[1]  # the unpaired CIs overlap


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    differences = np.random.default_rng(3).normal(loc=1.0, size=30)
    assert paired_bootstrap_ci(differences, seed=7) == paired_bootstrap_ci(differences, seed=7)
    low, high = paired_bootstrap_ci(differences)
    assert low < differences.mean() < high
    assert paired_bootstrap_ci([2.5, 2.5, 2.5]) == (2.5, 2.5)


def test_holm_matches_the_textbook_step_down():
    # Sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> raised to 0.06 (monotone).
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.2]), [0.5, 0.4])
    np.testing.assert_allclose(holm([0.9, 0.8, 0.7]), [1.0, 1.0, 1.0])  # capped at 1


def test_holm_skips_untested_entries():
    adjusted = holm([0.01, float("nan"), 0.04])
    assert np.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2]], [0.02, 0.04])  # m = 2, not 3


def test_paired_compare_drops_prompts_missing_on_either_side_and_refuses_misaligned_input():
    result = paired_compare([1.0, 2.0, float("nan"), 4.0], [0.0, float("nan"), 1.0, 1.0])
    assert result.num_pairs == 2
    assert result.difference == pytest.approx(2.0)  # (1 - 0 + 4 - 1) / 2
    assert np.isnan(paired_compare([float("nan")], [1.0]).p_value)
    with pytest.raises(ValueError, match="align"):
        paired_compare([1.0, 2.0], [1.0])


# --- several training seeds -------------------------------------------------------------------


def test_two_level_bootstrap_with_one_seed_is_the_prompt_bootstrap():
    rng = np.random.default_rng(3)
    differences = rng.normal(0.2, 1.0, size=40)
    assert stats.two_level_bootstrap_ci(differences[None, :], seed=4) == stats.paired_bootstrap_ci(differences, seed=4)


def test_two_level_bootstrap_known_answers():
    # The same difference in every cell: every resample has that mean.
    assert stats.two_level_bootstrap_ci(np.full((3, 20), 0.5)) == pytest.approx((0.5, 0.5))
    # Only the seeds differ (a seed effect, no prompt noise): the CI is the bootstrap over the 3 seed means,
    # whose resampled means lie on the grid {(a+b+c)/3}: from all-lowest -1 to all-highest +1.
    seed_only = np.repeat(np.array([[-1.0], [0.0], [1.0]]), 20, axis=1)
    low, high = stats.two_level_bootstrap_ci(seed_only, rounds=4000)
    assert -1.0 <= low <= -1 / 3 and 1 / 3 <= high <= 1.0
    # ...which a prompt-only bootstrap of the seed-averaged differences (all zero) would miss entirely.
    assert stats.paired_bootstrap_ci(seed_only.mean(axis=0)) == (0.0, 0.0)
    # NaN cells are left out of each resampled mean.
    with_gaps = np.full((2, 10), 1.0)
    with_gaps[0, :5] = np.nan
    assert stats.two_level_bootstrap_ci(with_gaps) == pytest.approx((1.0, 1.0))


def test_two_level_bootstrap_widens_when_seeds_disagree():
    rng = np.random.default_rng(0)
    prompts = rng.normal(0.0, 0.1, size=(1, 48))
    agreeing = 0.3 + prompts + rng.normal(0, 0.01, size=(3, 48))
    disagreeing = agreeing + np.array([[-0.3], [0.0], [0.3]])
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(stats.two_level_bootstrap_ci(disagreeing)) > 5 * width(stats.two_level_bootstrap_ci(agreeing))
    low, high = stats.two_level_bootstrap_ci(agreeing)
    assert low > 0  # three agreeing seeds: the effect counts
    assert stats.two_level_bootstrap_ci(disagreeing)[0] < 0.05  # one seed's luck does not carry it alone


def test_seed_permutation_p_known_answers():
    # Against one base run: sign flips of 3 per-seed differences, all positive -> 2 of 8 patterns as extreme.
    assert stats.seed_permutation_p([1.0, 2.0, 3.0], [0.0]) == pytest.approx(0.25)
    # Two groups of 3 runs, perfectly separated: 2 of the C(6,3) = 20 labellings are as extreme.
    assert stats.seed_permutation_p([5.0, 6.0, 7.0], [1.0, 2.0, 3.0]) == pytest.approx(0.1)
    assert stats.seed_permutation_p([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert np.isnan(stats.seed_permutation_p([1.0], [0.0]))  # one run against one run: no seed-level test
