"""Chat rendering through tinker-cookbook's renderers and tokenizer registry.

The cookbook loads tokenizers from the HF hub by name; the catalog's local models (`dpo_core.models`: the
built-ins and `DPO_LOCAL_MODELS` folders) get offline tokenizer factories, registered on first use, and
SmolLM2's ChatML gets its own renderer: `qwen3_instruct` writes the same ChatML but without SmolLM2's default
system turn, so the registered renderer (`dpo_suite/smollm2_chatml`) adds that turn when a conversation has no
system message. Its output equals `tokenizer.apply_chat_template(..., add_generation_prompt=True)` (tested).
Tinker's Qwen3 models use the cookbook's recommended renderer for their name.

Thread safety: HF fast tokenizers are shared (cached per model) and raise "Already borrowed" when two threads
use one at once (each encode resets the backend's truncation/padding state). A renderer from `get_renderer`
holds a tokenizer that takes `TOKENIZER_LOCK` on every call, so callers need no lock of their own.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpo_core import models as catalog

# Re-entrant, so code that still wraps renderer calls in it (one tokenizer call inside another) cannot deadlock.
TOKENIZER_LOCK = threading.RLock()

_registered = False  # set once the catalog's models and the SmolLM2 renderer are registered


def _with_default_system(messages: list[dict]) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        return list(messages)
    return [{"role": "system", "content": catalog.SMOLLM2_SYSTEM_PROMPT}, *messages]


@functools.cache
def _smollm2_renderer_class() -> type:
    from tinker_cookbook.renderers.qwen3 import Qwen3InstructRenderer

    class SmolLM2Renderer(Qwen3InstructRenderer):
        """ChatML as SmolLM2-Instruct's template writes it: Qwen3-instruct's ChatML + a default system turn."""

        def build_generation_prompt(self, messages, role="assistant", prefill=None):
            return super().build_generation_prompt(_with_default_system(messages), role, prefill)

        def build_supervised_example(self, messages, *args, **kwargs):
            return super().build_supervised_example(_with_default_system(messages), *args, **kwargs)

        def build_supervised_examples(self, messages, *args, **kwargs):
            return super().build_supervised_examples(_with_default_system(messages), *args, **kwargs)

    return SmolLM2Renderer


class LockedTokenizer:
    """A shared tokenizer whose every method call and attribute read holds `TOKENIZER_LOCK`."""

    def __init__(self, tokenizer: Any):
        object.__setattr__(self, "_tokenizer", tokenizer)

    @property
    def unlocked(self) -> Any:
        return self._tokenizer

    def __getattr__(self, name: str) -> Any:
        with TOKENIZER_LOCK:  # properties such as vocab_size read the shared backend too
            value = getattr(self._tokenizer, name)
        if not callable(value) or isinstance(value, type):
            return value

        @functools.wraps(value)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with TOKENIZER_LOCK:
                return value(*args, **kwargs)

        return locked

    def __setattr__(self, name: str, value: Any) -> None:
        with TOKENIZER_LOCK:
            setattr(self._tokenizer, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with TOKENIZER_LOCK:
            return self._tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        with TOKENIZER_LOCK:
            return len(self._tokenizer)

    def __repr__(self) -> str:
        return f"LockedTokenizer({self._tokenizer!r})"


def register_models(cache_dir: Path | None = None, local_models: dict[str, Path] | None = None) -> None:
    """Register offline tokenizers for the catalog's local models and the SmolLM2 renderer. Idempotent.

    `get_renderer` does this itself (with `Settings()`'s folders); call it to register models from a
    `Settings` object built in code rather than from the environment.
    """
    from tinker_cookbook import renderers, tokenizer_utils

    global _registered
    if cache_dir is None or local_models is None:
        from dpo_core.settings import Settings

        settings = Settings()
        cache_dir = settings.cache_dir if cache_dir is None else cache_dir
        local_models = settings.local_models if local_models is None else local_models
    with TOKENIZER_LOCK:
        for name in catalog.model_specs(local_models):
            tokenizer_utils.register_tokenizer(
                name, functools.partial(_cached_tokenizer, name, str(cache_dir), _freeze(local_models)))
        renderers.register_renderer(
            catalog.SMOLLM2_RENDERER, lambda tokenizer, image_processor=None: _smollm2_renderer_class()(tokenizer))
        _registered = True




def _freeze(mapping: dict[str, Path] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in (mapping or {}).items()))


@functools.cache
def _cached_tokenizer(name: str, cache_dir: str, extra: tuple[tuple[str, str], ...]) -> Any:
    return catalog.load_tokenizer(name, Path(cache_dir), {k: Path(v) for k, v in extra})


def _ensure_registered() -> None:
    if not _registered:
        register_models()


def renderer_name_for(model_name: str, extra_models: dict[str, Path] | None = None) -> str:
    """The renderer for a model: the catalog's choice for a local model (DPO_LOCAL_MODELS' folders included when
    `extra_models` is not given), else the cookbook's recommendation."""
    if extra_models is None:
        from dpo_core.settings import Settings

        extra_models = Settings().local_models
    return catalog.renderer_name_for(model_name, extra_models)


def get_tokenizer(model_name: str) -> LockedTokenizer:
    """The model's (shared) tokenizer, locked: offline for the catalog's local models, else from the hub."""
    from tinker_cookbook import tokenizer_utils

    _ensure_registered()
    with TOKENIZER_LOCK:
        return LockedTokenizer(tokenizer_utils.get_tokenizer(model_name))


def get_renderer(model_name: str, renderer_name: str | None = None) -> Any:
    """A cookbook renderer over the model's tokenizer; safe to use from several threads at once."""
    from tinker_cookbook import renderers

    tokenizer = get_tokenizer(model_name)
    with TOKENIZER_LOCK:  # renderers encode their special tokens on construction
        return renderers.get_renderer(renderer_name or renderer_name_for(model_name), tokenizer)


def render_pair_tokens(renderer: Any, prompt: Sequence[dict], response: Sequence[dict]) -> tuple[list[int], list[float]]:
    """prompt + response -> (tokens, weights): weight 1 on the response's tokens, 0 on the prompt's."""
    from tinker_cookbook.renderers import TrainOnWhat

    with TOKENIZER_LOCK:
        model_input, weights = renderer.build_supervised_example(
            [*prompt, *response], train_on_what=TrainOnWhat.LAST_ASSISTANT_MESSAGE
        )
    return list(model_input.to_ints()), [float(w) for w in weights.tolist()]
