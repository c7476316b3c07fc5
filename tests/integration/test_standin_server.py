"""The Tinker stand-in (`serve --stand-in tinker`) through the real tinker SDK over loopback."""

from __future__ import annotations

import numpy as np
import pytest
import tinker

from dpo_core import lineup
from dpo_core.local import standin
from dpo_core.local.launcher import local_server
from dpo_core.settings import Settings

QWEN3_8B = "Qwen/Qwen3-8B"


@pytest.fixture(scope="module")
def standin_client(tmp_path_factory, cache_dir):
    settings = Settings(cache_dir=cache_dir, local_storage=tmp_path_factory.mktemp("standin-storage"),
                        local_stand_in="tinker")
    with local_server(settings) as running:
        with tinker.ServiceClient(base_url=running.base_url, api_key=running.api_key) as client:
            yield client


def test_capabilities_are_tinkers_lineup_without_retired_models(standin_client):
    capabilities = standin_client.create_rest_client().get_server_capabilities().result()
    served = {m.model_name for m in capabilities.supported_models}
    assert served == set(lineup.served_names())
    trainable = {m.model_name for m in capabilities.supported_models if m.trainable and m.sampleable}
    assert trainable == set(standin.backed_names()) == {QWEN3_8B}
    assert "Qwen/Qwen3-4B-Instruct-2507" not in served and "Qwen/Qwen3-30B-A3B-Instruct-2507" not in served
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" not in served and "local/tiny" not in served


@pytest.mark.slow
def test_qwen3_8b_trains_and_samples_with_the_real_tokenizer(standin_client):
    tokenizer = standin.load_tokenizer(QWEN3_8B)
    training = standin_client.create_lora_training_client(base_model=QWEN3_8B, rank=4).result()
    info = training.get_info()
    assert info.model_data.tokenizer_id == QWEN3_8B  # the client loads it by repo id, as on Tinker

    tokens = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                        "weights": np.ones(len(tokens) - 1, dtype=np.float32)})
    losses = []
    for _ in range(3):
        result = training.forward_backward([datum], "cross_entropy").result()
        losses.append(result.metrics["loss:sum"])
        training.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    assert losses[-1] < losses[0]  # a real model is being trained

    sampler = training.save_weights_and_get_sampling_client(name="standin-check")
    prompt = tinker.ModelInput.from_ints(tokenizer.encode("Hello"))
    sample = sampler.sample(prompt, num_samples=2, sampling_params=tinker.SamplingParams(
        max_tokens=8, temperature=1.0, seed=3)).result()
    assert len(sample.sequences) == 2
    for sequence in sample.sequences:
        assert 1 <= len(sequence.tokens) <= 8
        assert all(0 <= t < len(tokenizer) for t in sequence.tokens)
        tokenizer.decode(sequence.tokens)


@pytest.mark.parametrize(("name", "words"), [
    ("Qwen/Qwen3.5-4B", "no tokenizer for it offline"),
    ("Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3.5-4B"),
])
def test_names_it_cannot_back_answer_a_clear_error(standin_client, name, words):
    with pytest.raises(tinker.RequestFailedError) as caught:
        standin_client.create_lora_training_client(base_model=name, rank=4).result()
    assert words in str(caught.value)
