"""The suite's plan (every TrainConfig key settable from the suite), list splitting, the lr schedules."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from dpo_core.config import TrainConfig, run_name
from dpo_core.plan import SuiteConfig, plan, plan_suite, split_lists
from dpo_core.train import learning_rate_at


def test_plan_crosses_datasets_models_rates_and_betas_in_order():
    config = SuiteConfig(datasets=[1, 2], models=["a/m1", "b/m2"], learning_rate=[1e-5, 2e-5], dpo_beta=[0.1, 0.2])
    experiments, _ = plan(config, "local")
    assert len(experiments) == 2 * 2 * 2 * 2
    assert [(e.dataset, e.model_name, e.learning_rate, e.dpo_beta) for e in experiments[:3]] == [
        (1, "a/m1", 1e-5, 0.1), (1, "a/m1", 1e-5, 0.2), (1, "a/m1", 2e-5, 0.1)]


def test_plan_takes_the_backends_defaults_when_unset():
    [local], local_eval = plan(SuiteConfig(datasets=[1]), "local")
    assert (local.model_name, local.batch_size, local.max_length, local.learning_rate) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", 6, 256, 1e-3)
    assert (local.lr_schedule, local.num_epochs, local.held_out_fraction) == ("constant", 1, 0.2)
    assert (local_eval.num_samples, local_eval.max_prompts, local_eval.max_tokens) == (4, 24, 128)
    tinker_runs, tinker_eval = plan(SuiteConfig(datasets=[1]), "tinker")
    assert len(tinker_runs) == 3 and {e.batch_size for e in tinker_runs} == {256}
    # Tinker keeps the seed guide's training defaults
    assert {(e.learning_rate, e.lr_schedule, e.num_epochs, e.held_out_fraction) for e in tinker_runs} == {
        (1e-5, "linear", 1, 0.1)}
    assert tinker_eval.max_prompts is None and tinker_eval.num_samples == 8


def test_every_training_key_but_the_per_experiment_ones_is_a_suite_key():
    assert set(TrainConfig.model_fields) - set(SuiteConfig.model_fields) == {"model_name", "dataset", "log_path"}
    config = SuiteConfig(datasets=[1], renderer_name="role_colon", wandb_name="sweep", lr_schedule="cosine",
                         resume=False, save_every=3, lora_rank=8, batch_size=4, max_length=128)
    [experiment], _ = plan(config, "local")
    assert (experiment.renderer_name, experiment.wandb_name, experiment.lr_schedule, experiment.resume) == (
        "role_colon", "sweep", "cosine", False)
    assert (experiment.save_every, experiment.lora_rank, experiment.batch_size, experiment.max_length) == (3, 8, 4, 128)


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"learning_rate": [-1.0]}, {"lr_schedule": "steps"},
                                 {"datasets": [4]}, {"unknown": 1}])
def test_the_suite_refuses_what_train_config_refuses(bad):
    with pytest.raises(ValidationError):
        SuiteConfig(**bad)


def test_plan_suite_names_each_experiment_as_its_run_folder():
    suite = plan_suite(SuiteConfig(datasets=[1, 3], dpo_beta=[0.1]), "local")
    assert [name.rsplit("_", 1)[0] for name in suite.run_names] == [
        "dataset1_smollm2135m_lr0.001_beta0.1", "dataset3_smollm2135m_lr0.001_beta0.1"]


def test_split_lists_splits_only_list_fields():
    assert split_lists({"datasets": "1, 2,", "dpo_beta": "0.05,0.1", "renderer_name": "a,b", "seed": "3"}) == {
        "datasets": ["1", "2"], "dpo_beta": ["0.05", "0.1"], "renderer_name": "a,b", "seed": "3"}
    config = SuiteConfig.model_validate(split_lists({"datasets": "1,2", "models": "x/y"}))
    assert config.datasets == [1, 2] and config.models == ["x/y"]


@pytest.mark.parametrize("schedule, halfway", [("linear", 0.5), ("cosine", 0.5), ("constant", 1.0)])
def test_learning_rate_at_follows_the_schedule(schedule, halfway):
    config = TrainConfig(model_name="local/tiny", dataset=1, learning_rate=1e-4, lr_schedule=schedule)
    assert learning_rate_at(config, 0, 10) == pytest.approx(1e-4)
    assert learning_rate_at(config, 5, 10) == pytest.approx(1e-4 * halfway)
    if schedule == "cosine":
        assert learning_rate_at(config, 2, 10) == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    if schedule == "linear":
        assert learning_rate_at(config, 9, 10) == pytest.approx(1e-5)


def test_local_default_plan_adds_the_positive_control_last_and_only_by_default():
    experiments, _ = plan(SuiteConfig(), "local")
    assert [e.dataset for e in experiments] == [1, 2, 3, "control_diversity.parquet", "control_quality.parquet"]
    for control in experiments[-2:]:
        assert (control.model_name, control.learning_rate) == (experiments[0].model_name,
                                                                experiments[0].learning_rate)
    assert [e.dataset for e in plan(SuiteConfig(datasets=[1]), "local")[0]] == [1]  # narrowed: no control
    assert [e.dataset for e in plan(SuiteConfig(datasets=[1], positive_control=True), "local")[0]] == [
        1, "control_diversity.parquet", "control_quality.parquet"]
    assert "control_diversity.parquet" not in [e.dataset for e in plan(SuiteConfig(), "tinker")[0]]


def test_seeds_replicate_every_condition_with_consecutive_training_seeds_and_their_own_run_names():
    experiments, eval_config = plan(SuiteConfig(datasets=[1, 2], seeds=3, seed=5), "local")
    assert [(e.dataset, e.seed) for e in experiments] == [(1, 5), (1, 6), (1, 7), (2, 5), (2, 6), (2, 7)]
    assert eval_config.seed == 5  # one sampling seed for every model: the paired design holds across seeds
    names = [run_name(e) for e in experiments]
    assert len(set(names)) == 6 and names[1].endswith("_seed6")
    assert not run_name(plan(SuiteConfig(datasets=[1]), "local")[0][0]).endswith("_seed0")  # seed 0: the seed's name
    controls = plan(SuiteConfig(datasets=[1], positive_control=True, seeds=2), "local")[0]
    assert [(e.dataset, e.seed) for e in controls][2:] == [("control_diversity.parquet", 0),
                                                           ("control_diversity.parquet", 1),
                                                           ("control_quality.parquet", 0),
                                                           ("control_quality.parquet", 1)]


def test_the_suite_sweeps_loss_type_like_dpo_beta_and_names_each_run_apart():
    config = SuiteConfig.model_validate(split_lists({"datasets": "1", "dpo_beta": "0.1,0.2",
                                                     "loss_type": "sigmoid,sigmoid_norm,ipo"}))
    suite = plan_suite(config, "local")
    assert [(e.dpo_beta, e.loss_type) for e in suite.experiments] == [
        (0.1, "sigmoid"), (0.1, "sigmoid_norm"), (0.1, "ipo"), (0.2, "sigmoid"), (0.2, "sigmoid_norm"), (0.2, "ipo")]
    names = [name.rsplit("_", 1)[0] for name in suite.run_names]
    assert names[:3] == ["dataset1_smollm2135m_lr0.001_beta0.1", "dataset1_smollm2135m_lr0.001_beta0.1_sigmoid_norm",
                         "dataset1_smollm2135m_lr0.001_beta0.1_ipo"]
    assert len(set(names)) == 6
    with pytest.raises(ValidationError):
        SuiteConfig(loss_type=["hinge"])


def test_loss_and_run_control_keys_reach_each_experiment():
    config = SuiteConfig(datasets=[1], label_smoothing=0.1, nll_weight=0.5, max_steps=12, adam_beta1=0.8,
                         adam_beta2=0.99, adam_eps=1e-6, eval_every=4, loss_type=["robust"])
    [experiment], _ = plan(config, "local")
    assert (experiment.loss_type, experiment.label_smoothing, experiment.nll_weight) == ("robust", 0.1, 0.5)
    assert (experiment.max_steps, experiment.adam_beta1, experiment.adam_beta2, experiment.adam_eps,
            experiment.eval_every) == (12, 0.8, 0.99, 1e-6, 4)
    from dpo_core.config import run_name

    assert "_robust0.1_rpo0.5_" in run_name(experiment)
