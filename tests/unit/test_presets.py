"""`preset=quick`: the offline suite's fast rehearsal, laid over the backend defaults without replacing them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dpo_core.config import check_step_count, held_out_size, num_steps
from dpo_core.plan import LOCAL_DEFAULTS, SuiteConfig, plan, split_lists


def test_quick_preset_shrinks_training_and_evaluation():
    [default], default_eval = plan(SuiteConfig(datasets=[1]), "local")
    [quick], quick_eval = plan(SuiteConfig(datasets=[1], preset="quick"), "local")
    assert quick.model_name == default.model_name and quick.learning_rate == default.learning_rate
    # a 40-pair subset (8 held out), still the >= 10 steps a run needs, on shorter sequences
    assert quick.max_pairs == 40 and default.max_pairs is None and quick.max_length < default.max_length
    check_step_count(quick, 160, "dataset 1")
    assert num_steps(40 - held_out_size(40, quick.held_out_fraction, quick.held_out_min_pairs), quick.batch_size,
                     quick.num_epochs) == 11
    assert quick_eval.max_prompts < default_eval.max_prompts
    assert quick_eval.max_tokens < default_eval.max_tokens and quick_eval.num_samples <= default_eval.num_samples


def test_explicit_keys_win_over_the_preset_and_defaults_stay_untouched():
    config = SuiteConfig.model_validate(split_lists({"preset": "quick", "batch_size": "4", "eval_max_tokens": "50"}))
    experiments, eval_config = plan(config, "local")
    # the three datasets plus the local default's two positive controls, every one at the explicit batch size
    assert len(experiments) == 5 and {e.batch_size for e in experiments} == {4}
    assert eval_config.max_tokens == 50 and eval_config.max_prompts == 6
    assert {e.max_pairs for e in experiments} == {40}
    [wider], _ = plan(SuiteConfig(preset="quick", datasets=[1], max_pairs=60), "local")
    assert wider.max_pairs == 60
    assert LOCAL_DEFAULTS["batch_size"] == 6 and LOCAL_DEFAULTS["eval_max_prompts"] == 24


def test_an_unknown_preset_is_refused():
    with pytest.raises(ValidationError):
        SuiteConfig(preset="fastest")
