"""The Tinker stand-in's pieces: Tinker's lineup, the real Qwen3 tokenizer, the tiny Qwen3 model, the HF cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_core import lineup
from dpo_core.local import standin
from tests.helpers.hf_cache import loopback_hub, prime_qwen3_8b
from tests.helpers.net import WATCH_CONNECTIONS

CONVERSATIONS = [
    [{"role": "user", "content": "Write a haiku about rain."}],
    [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a story about a lighthouse."},
    ],
]


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    return standin.load_tokenizer(standin.QWEN3_8B)


# ----------------------------------------------------------------------------------------------
# Lineup
# ----------------------------------------------------------------------------------------------


def test_lineup_is_tinkers_qwen_family_of_the_snapshot_date():
    assert lineup.LINEUP_DATE == "2026-11-29"
    assert "models.md" in lineup.LINEUP_SOURCE
    assert lineup.served_names() == [
        "Qwen/Qwen3.8-27B", "Qwen/Qwen3.6-35B-A3B", "Qwen/Qwen3.6-27B", "Qwen/Qwen3.5-397B-A17B",
        "Qwen/Qwen3.5-35B-A3B-Base", "Qwen/Qwen3.5-9B", "Qwen/Qwen3.5-9B-Base", "Qwen/Qwen3.5-4B", "Qwen/Qwen3-8B",
    ]


def test_retired_seed_models_point_to_served_successors():
    assert lineup.successor("Qwen/Qwen3-4B-Instruct-2507") == "Qwen/Qwen3.5-4B"
    assert lineup.successor("Qwen/Qwen3-30B-A3B-Instruct-2507") == "Qwen/Qwen3.6-35B-A3B"
    assert lineup.successor("Qwen/Qwen3-8B") is None
    for retired in lineup.RETIRED.values():
        assert retired.name not in lineup.served_names()
        successor = lineup.get(retired.successor)
        assert successor.kind == "hybrid"  # a chat model, never a -Base one
    with pytest.raises(KeyError, match="retired.*use Qwen/Qwen3.6-35B-A3B"):
        lineup.get("Qwen/Qwen3-30B-A3B-Instruct-2507")


def test_renderers_are_the_installed_cookbooks(qwen3_tokenizer):
    from tinker_cookbook import model_info, renderers

    for model in lineup.TINKER_LINEUP:
        recommended = model_info.get_recommended_renderer_names(model.name)
        assert model.recommended_renderer == recommended[0], model.name
        assert model.default_renderer in recommended, model.name
        if model.hybrid_thinking:
            assert model.default_renderer.endswith("_disable_thinking"), model.name
        else:
            assert model.default_renderer == model.recommended_renderer, model.name
    assert lineup.default_renderer("Qwen/Qwen3-8B") == "qwen3_disable_thinking"
    # get_renderer raises on an unknown name: every default must be one the cookbook can build (built here
    # with the Qwen3 tokenizer, the only one offline; construction checks the name, not the vocabulary).
    for model in lineup.TINKER_LINEUP:
        assert renderers.get_renderer(model.default_renderer, qwen3_tokenizer) is not None, model.default_renderer


# ----------------------------------------------------------------------------------------------
# Which names the stand-in backs
# ----------------------------------------------------------------------------------------------


def test_stand_in_backs_qwen3_8b_and_refuses_the_rest_clearly():
    assert standin.backed_names() == ["Qwen/Qwen3-8B"]
    spec = standin.standin_specs()["Qwen/Qwen3-8B"]
    assert (spec.kind, spec.renderer_name) == ("qwen3_standin", "qwen3_disable_thinking")

    with pytest.raises(standin.StandInUnavailable) as served_but_unbacked:
        standin.require_backed("Qwen/Qwen3.5-4B")
    assert "no tokenizer" in str(served_but_unbacked.value)
    assert "Qwen/Qwen3-8B" in str(served_but_unbacked.value)

    with pytest.raises(standin.StandInUnavailable, match="retired.*Qwen/Qwen3.5-4B"):
        standin.model_dir("Qwen/Qwen3-4B-Instruct-2507", Path("unused"))


# ----------------------------------------------------------------------------------------------
# The real Qwen3 tokenizer
# ----------------------------------------------------------------------------------------------


def test_tokenizer_is_the_real_qwen3_one(qwen3_tokenizer):
    assert qwen3_tokenizer.encode("Hello world") == [9707, 1879]
    ids = qwen3_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"])
    assert ids == [151644, standin.QWEN3_IM_END_ID, 151667, 151668, standin.QWEN3_ENDOFTEXT_ID]
    assert qwen3_tokenizer.eos_token_id == standin.QWEN3_IM_END_ID
    assert qwen3_tokenizer.pad_token_id == standin.QWEN3_ENDOFTEXT_ID
    assert len(qwen3_tokenizer) == standin.QWEN3_TOKENIZER_SIZE


def test_chat_template_renders_an_empty_think_block_without_thinking(qwen3_tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    without = qwen3_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    with_thinking = qwen3_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert without == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert with_thinking == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # the model may think


def _template_ids(tokenizer, messages, **kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def test_cookbook_renderer_equals_the_chat_template_without_thinking(qwen3_tokenizer):
    from tinker_cookbook import renderers

    renderer = renderers.get_renderer(lineup.default_renderer("Qwen/Qwen3-8B"), qwen3_tokenizer)
    for messages in CONVERSATIONS:
        prompt = renderer.build_generation_prompt(messages).to_ints()
        assert prompt == _template_ids(qwen3_tokenizer, messages, add_generation_prompt=True)

    # A training sequence (prompt + answer) differs in one token only: the template ends every turn with
    # "<|im_end|>\n", the renderer stops at <|im_end|>, the token sampling stops on.
    conversation = CONVERSATIONS[0] + [{"role": "assistant", "content": "Rain taps the window."}]
    trained, _weights = renderer.build_supervised_example(conversation)
    templated = _template_ids(qwen3_tokenizer, conversation)
    assert trained.to_ints() == templated[:-1]
    assert qwen3_tokenizer.decode(templated[-1:]) == "\n"
    assert trained.to_ints()[-1] == standin.QWEN3_IM_END_ID


# ----------------------------------------------------------------------------------------------
# The tiny deterministic model
# ----------------------------------------------------------------------------------------------


def test_same_seed_builds_the_same_weights():
    import torch

    first, second = standin.build_model(), standin.build_model()
    other_seed = standin.build_model(seed=standin.STANDIN_SEED + 1)
    first_weights, second_weights = first.state_dict(), second.state_dict()
    assert all(torch.equal(first_weights[key], second_weights[key]) for key in first_weights)
    assert not torch.equal(first_weights["model.embed_tokens.weight"], other_seed.state_dict()["model.embed_tokens.weight"])
    assert first.config.vocab_size == standin.QWEN3_TOKENIZER_SIZE
    assert first.config.model_type == "qwen3"


def test_building_does_not_move_the_callers_random_stream():
    import torch

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    standin.build_model()
    assert torch.equal(torch.rand(3), expected)


def test_cached_model_folder_loads_the_seeded_weights_and_the_real_tokenizer(tmp_path, qwen3_tokenizer):
    import torch
    from transformers import AutoTokenizer

    loaded = standin.load_model("Qwen/Qwen3-8B", tmp_path)
    built = standin.build_model().state_dict()
    assert all(torch.equal(tensor, built[key]) for key, tensor in loaded.state_dict().items())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    folder = standin.model_dir("Qwen/Qwen3-8B", tmp_path)
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == [folder.name]  # no temp folder left
    assert AutoTokenizer.from_pretrained(str(folder)).encode("Hello world") == [9707, 1879]

    prompt = torch.tensor([qwen3_tokenizer.encode("Hello world")])
    with torch.no_grad():
        logits = loaded(prompt).logits
    assert logits.shape == (1, 2, len(qwen3_tokenizer))
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------
# The HF cache, loaded by repo id as the client's tinker path does
# ----------------------------------------------------------------------------------------------

# Runs in a fresh interpreter: this test process imported huggingface_hub with HF_HUB_OFFLINE=1 (conftest),
# and the hub reads it once at import. The audit hook sees every address a socket resolves or connects to.
_LOAD_BY_REPO_ID = WATCH_CONNECTIONS + """
import json, time
from tinker_cookbook.tokenizer_utils import get_tokenizer
start = time.monotonic()
tokenizer = get_tokenizer("Qwen/Qwen3-8B")
print(json.dumps({"seconds": time.monotonic() - start, "hello": tokenizer.encode("Hello world"),
                  "source": tokenizer.name_or_path, "contacted": sorted(contacted)}))
"""


@pytest.mark.slow
def test_primed_cache_loads_by_repo_id_online_mode_without_leaving_loopback(tmp_path):
    repo = prime_qwen3_8b(tmp_path)
    assert (tmp_path / "hub/models--Qwen--Qwen3-8B/refs/main").read_text() == repo.revision
    assert (repo.snapshot / "tokenizer.json").resolve().parent.name == "blobs"

    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    with loopback_hub(repo) as hub:
        env.update(HF_HOME=str(tmp_path), HF_ENDPOINT=hub.url)
        run = subprocess.run([sys.executable, "-c", _LOAD_BY_REPO_ID], env=env, capture_output=True, text=True,
                             timeout=120, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])

    assert loaded["hello"] == [9707, 1879]
    assert loaded["contacted"] == ["127.0.0.1"]
    # An unreachable hub instead costs ~70 s of retries, then fails; the load itself took 27 s once on the
    # 2-vCPU machine under a load average of 15, so the bound sits between the two.
    assert loaded["seconds"] < 45
    # Online mode really was on: transformers asked the hub, and only HEADs/metadata, never a file body.
    assert ("GET", "/api/models/Qwen/Qwen3-8B") in hub.requests
    assert ("HEAD", "/Qwen/Qwen3-8B/resolve/main/tokenizer_config.json") in hub.requests
    assert not [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
