"""Built-in models: SmolLM2 from its GGUF (real weights), the renderer matching its chat template, and the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import tinker

from dpo_core import rendering
from dpo_core import models

SMOLLM2 = models.SMOLLM2


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about 42 cats."}],
])
def test_renderer_equals_the_tokenizers_chat_template(registered, messages):
    renderer = rendering.get_renderer(SMOLLM2)
    assert rendering.renderer_name_for(SMOLLM2) == models.SMOLLM2_RENDERER
    expected = renderer.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rendered = renderer.build_generation_prompt(messages).to_ints()
    assert renderer.tokenizer.decode(rendered) == expected
    assert rendered == renderer.tokenizer.encode(expected, add_special_tokens=False)
    assert renderer.get_stop_sequences() == [renderer.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_tokenizer_matches_the_gguf_vocabulary(registered):
    tokenizer = models.load_tokenizer(SMOLLM2, registered)
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.encode("Paris 2024", add_special_tokens=False)
    assert ids[0] != tokenizer.bos_token_id  # no BOS prepended (the GGUF conversion's mistake)
    assert tokenizer.decode(ids) == "Paris 2024"


def test_smollm2_answers_like_a_pretrained_model(service_client, registered):
    """The real weights, dequantised from the GGUF and cached, answer a factual question."""
    renderer = rendering.get_renderer(SMOLLM2)
    sampler = service_client.create_sampling_client(base_model=SMOLLM2).result()
    prompt = renderer.build_generation_prompt([{"role": "user", "content": "What is the capital of France?"}])
    result = sampler.sample(prompt, 1, tinker.SamplingParams(
        max_tokens=24, temperature=0.0, stop=renderer.get_stop_sequences())).result()
    text = renderer.tokenizer.decode(result.sequences[0].tokens)
    assert "Paris" in text
    assert (registered / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").exists()


def test_serve_cli_starts_prints_url_and_stops(tmp_path):
    env = {**os.environ, "DPO_LOCAL_STORAGE": str(tmp_path / "storage")}
    process = subprocess.Popen(
        [sys.executable, "-m", "dpo_core.local", "serve", "--port", "0", "--api-key", "tml-cli-test"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        url = None
        while time.monotonic() < deadline and url is None:
            line = process.stdout.readline()
            if "ready at" in line:
                url = line.strip().split("ready at ")[1]
        assert url and url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/api/v1/healthz", headers={"X-API-Key": "tml-cli-test"}).json() == {"status": "ok"}
        assert httpx.get(f"{url}/api/v1/healthz").status_code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "tml-cli-test" not in output  # a key given by the user is never printed
