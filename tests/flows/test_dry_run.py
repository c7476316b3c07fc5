"""`dry_run=true` on the train and suite entry points (subprocesses, as a user runs them): the plan, and nothing else."""

from __future__ import annotations

import json
import re

from tests.flows.test_cli import _env, _run

PRICES = json.dumps({"local/tiny": {"prefill": 1.0, "sample": 2.0, "train": 3.0}})


def test_train_dry_run_prints_the_plan_and_starts_nothing(tmp_path, registered, shipped_data):
    env = _env(tmp_path, DPO_CACHE_DIR=str(registered), DPO_DATA_DIR=str(shipped_data), DPO_PRICE_TABLE=PRICES)
    done = _run(["flows/train.py", "model_name=local/tiny", "dataset=1", "batch_size=4", "max_length=128",
                 "max_steps=12", "loss_type=ipo", "dry_run=true"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"_ipo_\S+: local/tiny on 1, loss ipo: 12 steps on \d+ pairs \(\d+ held out\), 1 checkpoint; "
                     r"[\d,]+ tokens to train", done.stdout), done.stdout
    assert re.search(r"Cost estimate: \$\d", done.stdout)
    # No run folder, no local server storage, no Prefect flow run: nothing was started.
    assert not (tmp_path / "experiments").exists() and not (tmp_path / "storage").exists()
    assert "Beginning flow run" not in done.stdout + done.stderr


def test_suite_dry_run_lists_every_experiment_and_its_evaluation(tmp_path, registered, shipped_data):
    env = _env(tmp_path, DPO_CACHE_DIR=str(registered), DPO_DATA_DIR=str(shipped_data))
    done = _run(["flows/suite.py", "models=local/tiny", "datasets=1,2", "loss_type=sigmoid,sigmoid_norm",
                 "batch_size=3", "max_pairs=40", "max_length=128", "eval_max_prompts=6", "eval_num_samples=2",
                 "eval_max_tokens=16", "positive_control=false", "dry_run=true"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = re.findall(r"^  (dataset\S+): local/tiny on (\d), loss (\S+): 11 steps", done.stdout, re.M)
    assert [(d, loss) for _, d, loss in trained] == [("1", "sigmoid"), ("1", "sigmoid_norm"), ("2", "sigmoid"),
                                                     ("2", "sigmoid_norm")]
    evaluated = re.findall(r"^  (trained|base) \S+: 6 prompts x 2 samples; [\d,]+ prompt tokens, <= 192 sampled",
                           done.stdout, re.M)
    assert evaluated == ["trained"] * 4 + ["base"]
    assert "no price table configured" in done.stdout
    assert not (tmp_path / "experiments").exists() and not (tmp_path / "storage").exists()
