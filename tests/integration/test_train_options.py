"""Loss variants and run control on the real SDK against the local server (`local/tiny`): what reaches the service."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dpo_core import data, dataset_checks
from dpo_core.checkpoints import read_jsonl
from dpo_core.config import TrainConfig
from dpo_core.train import train
from tests.helpers.recording import RecordingService

DATA = Path(__file__).resolve().parents[2] / "data"


def test_loss_type_adam_max_steps_and_eval_every_reach_the_run(service_client, tmp_path):
    path = data.resolve_dataset(1, DATA)
    pairs, _ = dataset_checks.validate(path)
    pairs = pairs[:20]
    config = TrainConfig(model_name="local/tiny", dataset=1, batch_size=4, num_epochs=3, learning_rate=2e-3,
                         dpo_beta=0.5, max_length=128, lr_schedule="linear", loss_type="sigmoid_norm",
                         nll_weight=0.2, max_steps=5, adam_beta1=0.8, adam_beta2=0.99, adam_eps=1e-6, eval_every=2,
                         save_every=0, held_out_fraction=0.2, held_out_min_pairs=4)
    recording = RecordingService(service_client)
    outcome = train(config, recording, pairs, run_dir=tmp_path / "run", dataset_path=str(path),
                    dataset_hash=data.content_hash(path), reference_dir=tmp_path / "ref")
    # max_steps caps 3 epochs x 4 batches at 5 steps; the linear schedule spans those 5.
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert outcome.steps == 5 and [m["step"] for m in metrics] == list(range(5))
    assert [round(m["learning_rate"] / 2e-3, 6) for m in metrics] == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert {(p.beta1, p.beta2, p.eps) for p in recording.adam_params} == {(0.8, 0.99, 1e-6)}
    assert len(recording.adam_params) == 5
    # The loss of the type, with the RPO term: at step 0 the policy is the reference, so the preference term is ln 2
    # and the total adds 0.2 x the chosen responses' NLL per token.
    first = metrics[0]
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3) and first["margin_norm"] == pytest.approx(0, abs=1e-3)
    assert first["loss"] == pytest.approx(first["dpo_loss"] + 0.2 * first["nll_loss"], rel=1e-5)
    assert first["nll_loss"] > 0
    # Held out at 2, 4 and the end (5), with no checkpoint but the final one (save_every=0).
    assert [r["name"] for r in read_jsonl(tmp_path / "run" / "held_out.jsonl")] == ["initial", "000002", "000004",
                                                                                    "final"]
    assert [r["name"] for r in read_jsonl(tmp_path / "run" / "checkpoints.jsonl")] == ["final"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train_config"]
    assert (saved["loss_type"], saved["nll_weight"], saved["max_steps"], saved["adam_beta1"], saved["adam_beta2"],
            saved["adam_eps"], saved["eval_every"]) == ("sigmoid_norm", 0.2, 5, 0.8, 0.99, 1e-6, 2)


def test_ipo_trains_past_the_step_0_reference_check_and_its_held_out_loss_is_ipo(service_client, tmp_path):
    """ipo's loss at zero margin is (1/2β)², not ln 2: the step-0 check must not mistake it for a wrong
    reference, and held_out.jsonl reports the run's own loss (as metrics.jsonl does), named."""
    path = data.resolve_dataset(1, DATA)
    pairs = data.load_pairs(path)[:16]
    config = TrainConfig(model_name="local/tiny", dataset=1, batch_size=4, max_length=96, learning_rate=1e-3,
                         dpo_beta=0.5, loss_type="ipo", max_steps=2, save_every=0, held_out_fraction=0.25,
                         held_out_min_pairs=4)
    train(config, service_client, pairs, run_dir=tmp_path / "run", dataset_path=str(path),
          dataset_hash=data.content_hash(path), reference_dir=tmp_path / "ref")
    first = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["dpo_loss"] == pytest.approx(1.0, abs=1e-3)  # (1 / (2 x 0.5))^2
    held = read_jsonl(tmp_path / "run" / "held_out.jsonl")
    assert [r["loss_type"] for r in held] == ["ipo", "ipo"]
    assert held[0]["dpo_loss"] == pytest.approx(1.0, abs=1e-3) and held[0]["accuracy"] == 0.5


def test_dry_run_counts_exactly_the_tokens_training_then_trains(service_client, registered, tmp_path):
    from dpo_core.dry_run import experiment_plan
    from dpo_core.settings import Settings

    path = data.resolve_dataset(1, DATA)
    pairs = data.load_pairs(path)  # as the flow does (dpo_core.experiment)
    config = TrainConfig(model_name="local/tiny", dataset=1, batch_size=6, num_epochs=3, max_pairs=24, max_steps=7,
                         max_length=96, held_out_fraction=0.25, held_out_min_pairs=4, eval_every=3, save_every=0)
    plan = experiment_plan(config, Settings(data_dir=DATA, cache_dir=registered))
    train(config, service_client, pairs, run_dir=tmp_path / "run", dataset_path=str(path),
          dataset_hash=data.content_hash(path), reference_dir=tmp_path / "ref")
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert plan["steps"] == len(metrics) == 7
    assert plan["train_tokens"] == sum(m["num_tokens"] for m in metrics)
    held = read_jsonl(tmp_path / "run" / "held_out.jsonl")
    assert plan["held_out_pairs"] == held[0]["num_pairs"] and plan["checkpoints"] == 1
    assert [r["step"] for r in held] == [0, 3, 6, 7]


def test_load_checkpoint_path_starts_from_those_weights_and_uses_them_as_the_reference(service_client, tmp_path):
    from dpo_core.config import ConfigError

    path = data.resolve_dataset(1, DATA)
    pairs = data.load_pairs(path)[:12]
    common = dict(model_name="local/tiny", dataset=1, batch_size=4, max_length=96, lr_schedule="constant",
                  held_out_fraction=0, lora_rank=4, dpo_beta=0.5)

    def run(name, **overrides):
        config = TrainConfig(**{**common, **overrides})
        train(config, service_client, pairs, run_dir=tmp_path / name, dataset_path=str(path),
              dataset_hash=data.content_hash(path), reference_dir=tmp_path / "ref")
        return read_jsonl(tmp_path / name / "metrics.jsonl")

    # An "SFT" starting point: a few large steps away from the base model.
    first = run("sft", learning_rate=2e-2, num_epochs=2)
    state_path = read_jsonl(tmp_path / "sft" / "checkpoints.jsonl")[-1]["state_path"]
    assert abs(first[-1]["margin"]) > 0.05  # the start point has moved away from the base model
    second = run("dpo", learning_rate=1e-3, load_checkpoint_path=state_path)
    # Step 0: the policy (the checkpoint's weights) IS the reference, so the loss is ln 2 and the margin 0; against
    # the base model's reference it would be the first run's trained margin instead.
    assert second[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3) and abs(second[0]["margin"]) < 1e-3
    # Another reference-cache key: two cache files, the checkpoint's not the base model's.
    caches = sorted((tmp_path / "ref").glob("*.npy"))
    assert len(caches) == 2
    values = [np.load(c) for c in caches]
    assert not np.allclose(values[0], values[1])
    saved = json.loads((tmp_path / "dpo" / "config.json").read_text())["train_config"]
    assert saved["load_checkpoint_path"] == state_path
    with pytest.raises(ConfigError, match="rank-4 adapter of local/tiny.*lora_rank=8"):
        run("wrong-rank", load_checkpoint_path=state_path, lora_rank=8)
