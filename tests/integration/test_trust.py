"""Every number computed on the weights it names: no cache or run folder crosses servers.

Two local servers serve different weights under one model name (`DPO_LOCAL_MODELS` maps `test/model` to two
folders of random tiny Llamas with SmolLM2's tokenizer). A run on the first, then the same command against the
second with the same cache and experiments folders, must train a new run whose reference is computed afresh:
its first-batch DPO loss is ln 2. Before, the second run said "already finished" and pointed at the first
server's checkpoints, and with a fresh experiments folder it trained against the first server's reference.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpo_core import data
from dpo_core import models as catalog
from dpo_core.checkpoints import read_jsonl
from dpo_core.config import ConfigError, TrainConfig
from dpo_core.records import RunConfig
from dpo_core.settings import Settings

NAME = "test/model"
DATA = Path(__file__).resolve().parents[2] / "data"


def _tiny_llama_folder(folder: Path, seed: int, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def two_weights(tmp_path_factory, registered) -> tuple[Path, Path]:
    tokenizer = catalog.tokenizer_dir(catalog.SMOLLM2, registered)
    return tuple(_tiny_llama_folder(tmp_path_factory.mktemp(f"weights{seed}"), seed, tokenizer) for seed in (1, 2))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    import pandas as pd

    from dpo_core import experiment

    frame = pd.read_parquet(data.resolve_dataset(1, DATA)).head(12)
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    frame.to_parquet(path)
    return experiment.validate_dataset(str(path), Settings(data_dir=path.parent))


def _settings(tmp_path: Path, weights: Path, storage: str) -> Settings:
    return Settings(backend="local", cache_dir=tmp_path / "cache", experiments_dir=tmp_path / "experiments",
                    local_storage=tmp_path / storage, local_models={NAME: weights})


def _config(**overrides) -> TrainConfig:
    values = dict(model_name=NAME, dataset="pairs.parquet", batch_size=3, num_epochs=1, learning_rate=1e-2,
                  dpo_beta=0.5, max_length=64, lora_rank=4, save_every=0, held_out_fraction=0.25,
                  held_out_min_pairs=2, allow_few_steps=True, renderer_name="role_colon")
    return TrainConfig(**{**values, **overrides})


@pytest.mark.minutes(1)
def test_a_rerun_on_other_weights_under_the_same_name_trains_afresh(two_weights, dataset, tmp_path, caplog):
    from dpo_core import experiment

    first_weights, second_weights = two_weights
    first = experiment.train_experiment(_config(), _settings(tmp_path, first_weights, "storage-a"), dataset)
    first_service = RunConfig.read_service(first.run_dir)
    assert first_service.weights and first_service.model_name == NAME and first_service.backend == "local"

    second = experiment.train_experiment(_config(), _settings(tmp_path, second_weights, "storage-b"), dataset)
    assert not second.already_finished and second.run_dir != first.run_dir  # a new run, not the first's
    second_service = RunConfig.read_service(second.run_dir)
    assert second_service.weights != first_service.weights
    references = sorted((tmp_path / "cache" / "reference").glob("*.npy"))
    assert len(references) == 2  # computed afresh on the second weights, beside the first's
    for run_dir in (first.run_dir, second.run_dir):
        [step0, *_] = read_jsonl(Path(run_dir) / "metrics.jsonl")
        # float32 sums of <= 64 tokens on one CPU: the untrained policy equals the reference to ~1e-5 nats.
        assert step0["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3)
        [initial, *_] = read_jsonl(Path(run_dir) / "held_out.jsonl")
        assert initial["name"] == "initial" and initial["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3)

    # The same command against the first server again: its run is finished, on its own service.
    again = experiment.train_experiment(_config(), _settings(tmp_path, first_weights, "storage-a"), dataset)
    assert again.already_finished and again.run_dir == first.run_dir

    # An explicit log_path of the first run, against the second server: refused, naming both services.
    with pytest.raises(ConfigError) as refused:
        experiment.train_experiment(_config(log_path=first.run_dir), _settings(tmp_path, second_weights,
                                                                               "storage-b"), dataset)
    message = str(refused.value)
    assert first_service.weights[:19] in message and second_service.weights[:19] in message


def test_a_reference_of_other_weights_stops_the_run_at_step_0(two_weights, dataset, tmp_path):
    """Defence in depth: a cache file that passes its key check but holds another model's values (as a cache
    written by an older version did) is caught by the first batch's loss, before any update is saved."""
    from dpo_core.backend import service_client
    from dpo_core.reference import reference_id, reference_key
    from dpo_core.service import identify
    from dpo_core.train import ReferenceMismatchError, train

    first_weights, second_weights = two_weights
    pairs = data.load_pairs(Path(dataset.path))
    config = _config()
    with service_client(_settings(tmp_path, first_weights, "storage-a")) as client:
        train(config, client, pairs, run_dir=tmp_path / "a", dataset_path=dataset.path,
              dataset_hash=dataset.sha256, reference_dir=tmp_path / "ref")
    [first_file] = (tmp_path / "ref").glob("*.npy")
    with service_client(_settings(tmp_path, second_weights, "storage-b")) as client:
        service = identify(client, NAME, "local")
        renderer = RunConfig.read(tmp_path / "a").renderer_name
        second_file = tmp_path / "ref" / (reference_key(reference_id(service), dataset.sha256, renderer,
                                                        config.max_length) + ".npy")
        train(config, client, pairs, run_dir=tmp_path / "b", dataset_path=dataset.path,
              dataset_hash=dataset.sha256, reference_dir=tmp_path / "ref", service=service)
        assert second_file.exists()
        shutil.copy(first_file, second_file)  # the second key, the first weights' values
        with pytest.raises(ReferenceMismatchError) as stopped:
            train(config, client, pairs, run_dir=tmp_path / "c", dataset_path=dataset.path,
                  dataset_hash=dataset.sha256, reference_dir=tmp_path / "ref", service=service)
    assert "the reference does not match the policy's weights" in str(stopped.value)
    assert str(second_file) in str(stopped.value)
    assert not (tmp_path / "c" / "checkpoints.jsonl").exists()  # nothing trained on it was saved


def test_a_cache_hit_whose_sequences_differ_is_recomputed(two_weights, dataset, tmp_path, caplog):
    """A hit is checked against the current sequence keys (`.seqs.json`), not just the array's shape."""
    from dpo_core.backend import service_client
    from dpo_core.reference import reference_id, reference_logprobs, sequences_file
    from dpo_core.rendering import get_renderer
    from dpo_core.service import identify
    from dpo_core.train import render_pairs

    pairs = data.load_pairs(Path(dataset.path))[:4]
    settings = _settings(tmp_path, two_weights[0], "storage-a")
    with service_client(settings) as client:
        ref_id = reference_id(identify(client, NAME, "local"))
        rendered = render_pairs(pairs, get_renderer(NAME, "role_colon"), 64, dataset.path)
        calls = []

        def sampler():
            calls.append(1)
            return client.create_sampling_client(base_model=NAME).result()

        cache_file = tmp_path / "ref" / "key.npy"
        computed = reference_logprobs(sampler, ref_id, rendered, cache_file)
        assert len(calls) == 1
        np.testing.assert_array_equal(reference_logprobs(sampler, ref_id, rendered, cache_file), computed)
        assert len(calls) == 1  # a verified hit
        # Same shape, other sequence keys (as after a tokenizer or renderer change gave other tokens).
        stored = json.loads(sequences_file(cache_file).read_text())
        stored[0][0] = "0" * 32
        sequences_file(cache_file).write_text(json.dumps(stored))
        with caplog.at_level(logging.WARNING, logger="dpo_core.reference"):
            recomputed = reference_logprobs(sampler, ref_id, rendered, cache_file)
        assert len(calls) == 2 and "computed for other sequences" in caplog.text
        np.testing.assert_array_equal(recomputed, computed)  # same weights, same sequences: same values
        assert json.loads(sequences_file(cache_file).read_text())[0][0] != "0" * 32  # the keys rewritten


def _tiny_run(service_client, tmp_path, **overrides):
    from dpo_core.train import train

    path = data.resolve_dataset(1, DATA)
    pairs = data.load_pairs(path)[:8]
    values = dict(model_name="local/tiny", dataset=1, batch_size=4, num_epochs=2, learning_rate=1e-3,
                  max_length=64, lr_schedule="constant", save_every=2, held_out_fraction=0, allow_few_steps=True)
    config = TrainConfig(**{**values, **overrides})
    return train(config, service_client, pairs, run_dir=tmp_path / "run", dataset_path=str(path),
                 dataset_hash=data.content_hash(path), reference_dir=tmp_path / "ref")


def test_periodic_checkpoints_expire_and_the_final_one_is_kept(service_client, server, tmp_path):
    from dpo_core.checkpoints import read_checkpoints
    from dpo_core.sampling import Sampler

    _tiny_run(service_client, tmp_path)
    records = read_checkpoints(tmp_path / "run")
    assert [(r.name, r.ttl_seconds) for r in records] == [("000002", 7 * 24 * 3600), ("final", None)]
    assert records[0].expires_at is not None and records[-1].expires_at is None
    # The service was given the time to live: it lists the periodic checkpoint's expiry, not the final one's.
    listed = {c.tinker_path: c.expires_at for c in
              service_client.create_rest_client().list_checkpoints(records[0].state_path.split("/")[2]).result()
              .checkpoints}
    assert listed[records[0].state_path] is not None and listed[records[-1].state_path] is None

    # Past its expiry (rewritten here: the shortest TTL is an hour), sampling it is a clear error naming the run
    # and the step, on the client before any request, and on the server for a client that asks anyway.
    registry = tmp_path / "run" / "checkpoints.jsonl"
    rows = read_jsonl(registry)
    rows[0]["expires_at"] = 1.0
    registry.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FileNotFoundError) as expired:
        Sampler.from_run(tmp_path / "run", checkpoint="000002", service_client=service_client)
    assert "000002" in str(expired.value) and "step 2" in str(expired.value) and str(tmp_path / "run") in str(
        expired.value)
    _, _, _, folder = server.engine.checkpoint_dir(records[0].sampler_path)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "expires_at": 1.0}))
    import tinker

    with pytest.raises(tinker.BadRequestError, match="expired"):
        service_client.create_sampling_client(model_path=records[0].sampler_path).result()


def test_a_resume_with_another_renderer_is_refused_naming_both(service_client, tmp_path):
    _tiny_run(service_client, tmp_path, num_epochs=1)
    with pytest.raises(ConfigError) as refused:
        _tiny_run(service_client, tmp_path, num_epochs=2, renderer_name="role_colon")
    assert "dpo_suite/smollm2_chatml" in str(refused.value) and "role_colon" in str(refused.value)
    # The training run on the service holds the renderer too: caught there when config.json says nothing.
    config_file = tmp_path / "run" / "config.json"
    record = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**record, "renderer_name": "role_colon"}))
    with pytest.raises(ConfigError, match="the training run's metadata"):
        _tiny_run(service_client, tmp_path, num_epochs=2, renderer_name="role_colon")
