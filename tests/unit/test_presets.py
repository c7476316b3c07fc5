"""`preset=quick`: the offline suite's fast rehearsal, laid over the backend defaults without replacing them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dpo_core.plan import LOCAL_DEFAULTS, SuiteConfig, plan, split_lists


def test_quick_preset_shrinks_training_and_evaluation():
    [default], default_eval = plan(SuiteConfig(datasets=[1]), "local")
    [quick], quick_eval = plan(SuiteConfig(datasets=[1], preset="quick"), "local")
    assert quick.model_name == default.model_name and quick.learning_rate == default.learning_rate
    assert quick.batch_size > default.batch_size and quick.max_length < default.max_length  # fewer, shorter steps
    assert quick_eval.max_prompts < default_eval.max_prompts
    assert quick_eval.max_tokens < default_eval.max_tokens and quick_eval.num_samples <= default_eval.num_samples


def test_explicit_keys_win_over_the_preset_and_defaults_stay_untouched():
    config = SuiteConfig.model_validate(split_lists({"preset": "quick", "batch_size": "4", "eval_max_tokens": "50"}))
    experiments, eval_config = plan(config, "local")
    # the three datasets plus the local default's positive control, every one at the explicit batch size
    assert len(experiments) == 4 and {e.batch_size for e in experiments} == {4}
    assert eval_config.max_tokens == 50 and eval_config.max_prompts == 6
    assert LOCAL_DEFAULTS["batch_size"] == 6 and LOCAL_DEFAULTS["eval_max_prompts"] == 24


def test_an_unknown_preset_is_refused():
    with pytest.raises(ValidationError):
        SuiteConfig(preset="fastest")
