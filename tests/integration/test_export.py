"""Export round trip on the real SDK and the local server: train a few steps, export through the SDK's download
route, load the adapter with peft on the base model, and get the server sampler's per-token logprobs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_core import data
from dpo_core.config import TrainConfig
from dpo_core.train import train

DATA = Path(__file__).resolve().parents[2] / "data"
TINY = "local/tiny"


@pytest.fixture(scope="module")
def trained_run(service_client, tmp_path_factory):
    path = data.resolve_dataset(1, DATA)
    pairs = data.load_pairs(path)[:8]
    run_dir = tmp_path_factory.mktemp("export") / "run"
    # A large learning rate: the adapter must move far from zero, or "same logprobs as the base" would pass too.
    config = TrainConfig(model_name=TINY, dataset=1, batch_size=4, num_epochs=2, learning_rate=2e-2, dpo_beta=0.5,
                         max_length=64, lr_schedule="constant", held_out_fraction=0, save_every=2, lora_rank=4)
    train(config, service_client, pairs, run_dir=run_dir, dataset_path=str(path), dataset_hash=data.content_hash(path),
          reference_dir=run_dir.parent / "ref")
    return run_dir


def _server_logprobs(service_client, sampler_path: str, tokens: list[int]) -> np.ndarray:
    import tinker

    sampler = service_client.create_sampling_client(model_path=sampler_path)
    return np.asarray(sampler.compute_logprobs(tinker.ModelInput.from_ints(tokens)).result()[1:], dtype=np.float64)


def _hf_logprobs(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].double()
    picked = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
    return picked.numpy()


def test_peft_export_gives_the_servers_logprobs_for_that_checkpoint(service_client, server, registered, tmp_path,
                                                                    trained_run):
    from peft import PeftModel

    from dpo_core.checkpoints import read_checkpoints
    from dpo_core.export import export_run
    from dpo_core.local import store
    from dpo_core.settings import Settings

    settings = Settings(cache_dir=registered)
    out = export_run(trained_run, tmp_path / "peft", service_client, settings, step="final", fmt="peft")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["base_model_name_or_path"] == TINY

    base = store.load_model(TINY, registered)
    policy = PeftModel.from_pretrained(base, str(out)).eval()
    tokens = data.load_pairs(data.resolve_dataset(1, DATA))[0].prompt_text()
    from dpo_core import rendering

    ids = rendering.get_tokenizer(TINY).encode(tokens)[:48]
    final = [r for r in read_checkpoints(trained_run) if r.name == "final"][0]
    served = _server_logprobs(service_client, final.sampler_path, ids)
    exported = _hf_logprobs(policy, ids)
    with policy.disable_adapter():
        base_logprobs = _hf_logprobs(policy, ids)
    # float32 end to end (CPU): the server merges B·A into the weights for sampling, peft adds it in activation
    # space, so each logprob differs by float32 roundings (eps 1.2e-7) of logits of order 10 accumulated over 2
    # layers of 64-wide sums: ~1e-6 (measured 6.8e-7); 1e-5 bounds that, 10^4 below the adapter's own effect (0.5).
    assert np.max(np.abs(served - exported)) < 1e-5
    assert np.max(np.abs(exported - base_logprobs)) > 1e-2  # the exported adapter is not a no-op


def test_merged_export_through_the_cli_gives_the_same_logprobs(service_client, server, registered, tmp_path,
                                                               trained_run, monkeypatch):
    from transformers import AutoModelForCausalLM

    from dpo_core import rendering
    from dpo_core.__main__ import main
    from dpo_core.checkpoints import read_checkpoints

    # The command starts its own local server over the same storage, as a user's second command would.
    monkeypatch.setenv("DPO_LOCAL_STORAGE", str(server.engine.storage))
    monkeypatch.setenv("DPO_CACHE_DIR", str(registered))
    monkeypatch.setenv("DPO_BACKEND", "local")
    out = tmp_path / "merged"
    assert main(["export", str(trained_run), "--step", "2", "--format", "merged", "--out", str(out)]) == 0
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = rendering.get_tokenizer(TINY).encode("Write a short poem about the sea, please.")
    [checkpoint] = [r for r in read_checkpoints(trained_run) if r.step == 2]
    served = _server_logprobs(service_client, checkpoint.sampler_path, ids)
    assert np.max(np.abs(served - _hf_logprobs(merged, ids))) < 1e-5  # both merge B·A into float32 weights
    assert json.loads((out / "dpo_export.json").read_text())["checkpoint"] == "000002"
    assert main(["export", str(trained_run), "--step", "7", "--out", str(tmp_path / "x")]) == 1  # no such step
