"""The DPO loop on the real SDK against the local server (`local/tiny`): files, learning, resume, sweeps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dpo_core import data, dataset_checks
from dpo_core.checkpoints import final_record, list_experiments, read_jsonl
from dpo_core.config import TrainConfig
from dpo_core.sampling import Sampler
from dpo_core.loss import TIE_TOLERANCE
from dpo_core.train import train
from tests.helpers.recording import RecordingService
from tests.helpers.reference import base_reference

DATA = Path(__file__).resolve().parents[2] / "data"
TINY = "local/tiny"
METRIC_KEYS = {"step", "epoch", "split", "loss", "dpo_loss", "accuracy", "margin", "chosen_reward", "rejected_reward",
               "logps/chosen", "logps/rejected", "ties", "learning_rate", "num_pairs", "num_tokens", "progress",
               "time/step",
               "time/start"}


@pytest.fixture(scope="module")
def dataset():
    path = data.resolve_dataset(1, DATA)
    pairs, _ = dataset_checks.validate(path)
    return path, pairs[:8], data.content_hash(path)


def _config(**overrides) -> TrainConfig:
    values = dict(model_name=TINY, dataset=1, batch_size=4, num_epochs=3, learning_rate=2e-3, dpo_beta=0.5,
                  max_length=128, lr_schedule="constant")
    return TrainConfig(**{**values, **overrides})


def _train(service_client, dataset, run_dir, reference_dir, config=None, sinks=()):
    path, pairs, sha = dataset
    return train(config or _config(), service_client, pairs, run_dir=run_dir, dataset_path=str(path),
                 dataset_hash=sha, reference_dir=reference_dir, metrics_sinks=sinks)


class Crash(RuntimeError):
    pass


class CrashAt:
    """A metrics sink that dies at one step, after that step's metrics line is written (like kill -9)."""

    def __init__(self, step: int):
        self.step = step

    def log(self, metrics, step):
        if step == self.step:
            raise Crash(f"simulated crash at step {step}")


def test_one_run_writes_the_three_files_and_learns(service_client, dataset, tmp_path):
    result = _train(service_client, dataset, tmp_path / "run", tmp_path / "ref")
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(6)) and result.steps == 6
    assert all(set(m) == METRIC_KEYS for m in metrics)
    assert metrics[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics[-1]["dpo_loss"] < math.log(2) and metrics[-1]["accuracy"] > 0.5 and metrics[-1]["margin"] > 0
    records = read_jsonl(tmp_path / "run" / "checkpoints.jsonl")
    assert records[-1]["name"] == "final"
    assert set(records[-1]) >= {"name", "epoch", "batch", "state_path", "sampler_path"}
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train_config"]["dpo_beta"] == 0.5 and saved["dataset_sha256"] == dataset[2]
    assert saved["versions"]["tinker"] == "0.38.0"
    again = _train(service_client, dataset, tmp_path / "run", tmp_path / "ref")
    assert again.already_finished and len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 6
    [status] = [s for s in list_experiments(tmp_path) if s.name == "run"]
    assert status.status == "finished" and status.sampler_path == records[-1]["sampler_path"]


@pytest.mark.minutes(2)
def test_crash_and_resume_loses_and_repeats_no_step(service_client, server, dataset, tmp_path):
    config = _config(save_every=2)
    reference = _train(service_client, dataset, tmp_path / "clean", tmp_path / "ref", config)
    requests_before = server.engine.counters["prompt_logprob_requests"]
    with pytest.raises(Crash):
        _train(service_client, dataset, tmp_path / "crashed", tmp_path / "ref", config, sinks=[CrashAt(3)])
    assert [m["step"] for m in read_jsonl(tmp_path / "crashed" / "metrics.jsonl")] == [0, 1, 2, 3]
    resumed = _train(service_client, dataset, tmp_path / "crashed", tmp_path / "ref", config)
    steps = [m["step"] for m in read_jsonl(tmp_path / "crashed" / "metrics.jsonl")]
    assert steps == list(range(6)) and resumed.steps == reference.steps
    clean = read_jsonl(tmp_path / "clean" / "metrics.jsonl")
    crashed = read_jsonl(tmp_path / "crashed" / "metrics.jsonl")
    for a, b in zip(clean, crashed):
        assert a["dpo_loss"] == pytest.approx(b["dpo_loss"], abs=1e-4)
    # The reference logprobs were never recomputed: not for the crashed run, not for its resume.
    assert server.engine.counters["prompt_logprob_requests"] == requests_before


def test_extending_epochs_continues_the_run(service_client, dataset, tmp_path):
    _train(service_client, dataset, tmp_path / "run", tmp_path / "ref", _config(num_epochs=1))
    longer = _train(service_client, dataset, tmp_path / "run", tmp_path / "ref", _config(num_epochs=2))
    assert longer.steps == 4 and not longer.already_finished
    assert [m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2, 3]


def test_extending_epochs_of_a_decaying_schedule_is_refused_with_the_way_out(service_client, dataset, tmp_path):
    from dpo_core.config import ConfigError

    _train(service_client, dataset, tmp_path / "run", tmp_path / "ref", _config(num_epochs=1, lr_schedule="linear"))
    with pytest.raises(ConfigError) as refused:
        _train(service_client, dataset, tmp_path / "run", tmp_path / "ref", _config(num_epochs=2, lr_schedule="linear"))
    message = str(refused.value)
    assert "linear learning-rate schedule over 2 steps" in message and "resume=false" in message
    assert "lr_schedule=constant" in message
    assert [m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 1]  # nothing trained


def test_beta_sweep_computes_reference_logprobs_once(service_client, server, dataset, tmp_path):
    before = server.engine.counters["prompt_logprob_requests"]
    for beta in (0.1, 0.2):
        _train(service_client, dataset, tmp_path / f"beta{beta}", tmp_path / "ref",
               _config(dpo_beta=beta, num_epochs=1))
    assert server.engine.counters["prompt_logprob_requests"] - before == 16  # 8 pairs x 2, once


def test_reference_logprobs_reuse_the_sequences_another_dataset_holds(service_client, server, dataset, tmp_path):
    """Datasets built from one candidate pool share texts: a shared sequence is computed once, across files;
    one whose tokens differ (here: cut by another max_length) is not taken for it."""
    from dpo_core import rendering
    from dpo_core.train import render_pairs

    path, pairs, _ = dataset
    renderer = rendering.get_renderer(TINY)
    first, second = (render_pairs(chunk, renderer, 128, str(path)) for chunk in (pairs[:6], pairs[3:8]))

    def requests() -> int:
        return server.engine.counters["prompt_logprob_requests"]

    before = requests()
    base_reference(service_client, TINY, first, tmp_path / "ref" / "first.npy")
    assert requests() - before == 12
    before = requests()
    shared = base_reference(service_client, TINY, second, tmp_path / "ref" / "second.npy")
    assert requests() - before == 4  # pairs 6 and 7 only: 3, 4 and 5 are the first file's
    alone = base_reference(service_client, TINY, second, tmp_path / "elsewhere" / "second.npy")
    np.testing.assert_allclose(shared, alone, rtol=1e-5, atol=1e-4)
    before = requests()
    cut = render_pairs(pairs[:6], renderer, 100, str(path))
    base_reference(service_client, TINY, cut, tmp_path / "ref" / "cut.npy")
    changed = sum(getattr(a, side).model_input.to_ints() != getattr(b, side).model_input.to_ints()
                  for a, b in zip(first, cut) for side in ("chosen", "rejected"))
    assert changed > 0 and requests() - before == changed


def test_max_pairs_trains_and_holds_out_within_a_seeded_subset(service_client, server, tmp_path):
    path = data.resolve_dataset(2, DATA)
    pairs, _ = dataset_checks.validate(path)
    before = server.engine.counters["prompt_logprob_requests"]
    train(_config(dataset=2, max_pairs=20, num_epochs=1, held_out_fraction=0.2), service_client, pairs,
          run_dir=tmp_path / "run", dataset_path=str(path), dataset_hash=data.content_hash(path),
          reference_dir=tmp_path / "ref")
    assert server.engine.counters["prompt_logprob_requests"] - before == 40  # the subset's 20 pairs only
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    used, held = record["pair_rows"], record["held_out_rows"]
    assert len(used) == 20 and used != list(range(20)) and len(held) == 8 and set(held) < set(used)
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 3  # 12 trained pairs at batch 4


def test_sampler_from_final_checkpoint_differs_from_base(service_client, dataset, tmp_path):
    _train(service_client, dataset, tmp_path / "run", tmp_path / "ref", _config(learning_rate=2e-2))
    final = final_record(tmp_path / "run")
    prompts = ["Write a short poem about the ocean."]
    trained = Sampler(TINY, final.sampler_path, temperature=1.0, max_tokens=12, seed=4,
                      service_client=service_client).complete_many(prompts, num_samples=2)
    base = Sampler(TINY, None, temperature=1.0, max_tokens=12, seed=4,
                   service_client=service_client).complete_many(prompts, num_samples=2)
    assert len(trained[0]) == 2 and all(isinstance(t, str) for t in trained[0])
    assert trained != base


@pytest.mark.minutes(2.5)
def test_wandb_offline_logs_metrics_and_config_without_secrets(tmp_path, registered, monkeypatch, shipped_data):
    from dpo_core import experiment
    from dpo_core.settings import Settings

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "canary-wandb-key-0123456789abcdef0123")
    settings = Settings(data_dir=shipped_data, experiments_dir=tmp_path / "experiments", cache_dir=registered,
                        local_storage=tmp_path / "storage", backend="local", wandb_mode="offline")
    dataset = experiment.validate_dataset(3, settings)
    config = _config(dataset=3, num_epochs=1, batch_size=32, wandb_project="cs329x-dpo", allow_few_steps=True)
    result = experiment.train_experiment(config, settings, dataset)
    run_dir = Path(result.run_dir)
    wandb_files = list((run_dir / "wandb").rglob("*"))
    log = next(f for f in wandb_files if f.suffix == ".wandb").read_bytes()  # the offline run's record log
    assert b"dpo_beta" in log and b"dpo_loss" in log and b"cs329x-dpo" in log
    for file in wandb_files + list(run_dir.glob("*.json*")):
        if file.is_file():
            assert b"canary-wandb-key" not in file.read_bytes()


def test_concurrent_runs_of_one_experiment_get_separate_folders(tmp_path, registered):
    """Two processes' claims on the same experiment at the same moment: the second moves on to `_2`."""
    from dpo_core.experiment import claim_run_dir

    config = _config()
    first, lock = claim_run_dir(config, tmp_path / "experiments", tmp_path / "locks")
    second, other = claim_run_dir(config, tmp_path / "experiments", tmp_path / "locks")
    assert first.name + "_2" == second.name
    lock.close()
    third, again = claim_run_dir(config, tmp_path / "experiments", tmp_path / "locks")
    assert third == first  # released: the same experiment resumes its folder
    other.close()
    again.close()


def test_held_out_pairs_are_never_trained_on_and_scored_at_every_save(service_client, tmp_path):
    path = data.resolve_dataset(1, DATA)
    pairs, _ = dataset_checks.validate(path)
    pairs = pairs[:20]
    recording = RecordingService(service_client)
    config = _config(num_epochs=2, save_every=4, held_out_fraction=0.2, held_out_min_pairs=4)
    train(config, recording, pairs, run_dir=tmp_path / "run", dataset_path=str(path),
          dataset_hash=data.content_hash(path), reference_dir=tmp_path / "ref")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    held_rows = saved["held_out_rows"]
    assert len(held_rows) == 4
    # Every row not held out is trained on, and no held-out pair's tokens were ever sent to a training step.
    from dpo_core import rendering
    from dpo_core.train import render_pairs

    renderer = rendering.get_renderer(TINY, rendering.renderer_name_for(TINY))
    rendered = render_pairs(pairs, renderer, config.max_length, str(path))
    held = {tuple(p.chosen.model_input.to_ints()) for p, pair in zip(rendered, pairs) if pair.row in held_rows}
    trained = set(recording.trained_tokens)
    assert held and not held & trained
    assert {tuple(p.chosen.model_input.to_ints()) for p, pair in zip(rendered, pairs)
            if pair.row not in held_rows} <= trained
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(metrics) == 8 and all(m["split"] == "train_batch" for m in metrics)  # 16 pairs / 4 x 2 epochs
    scored = read_jsonl(tmp_path / "run" / "held_out.jsonl")
    assert [r["name"] for r in scored] == ["initial", "000004", "final"] and all(r["num_pairs"] == 4 for r in scored)
    # Measured on the untrained policy (adapter zero): the reference up to float32 noise, every margin a tie.
    initial = scored[0]
    assert initial["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3) and abs(initial["margin"]) < TIE_TOLERANCE
    assert initial["ties"] == 4 and initial["accuracy"] == 0.5
    # Computed on the saved weights: they moved the held-out margins away from the reference's zero.
    assert scored[-1]["margins"] != scored[0]["margins"] and scored[-1]["dpo_loss"] != pytest.approx(math.log(2))
