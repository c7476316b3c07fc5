"""Chat rendering through tinker-cookbook's renderers and tokenizer registry.

The cookbook loads tokenizers from the HF hub by name; for the local built-in models we register offline
factories with `tokenizer_utils.register_tokenizer`, and a renderer for SmolLM2's ChatML template:
`qwen3_instruct` writes the same ChatML but without SmolLM2's default system turn, so the registered
renderer (`dpo_suite/smollm2_chatml`) adds that turn when a conversation has no system message. Its output
equals `tokenizer.apply_chat_template(..., add_generation_prompt=True)` (tested).
Tinker's Qwen3 models use the cookbook's recommended renderer for their name.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpo_core.local import models as local_models

# HF fast tokenizers are shared (cached per model) and raise "Already borrowed" when two threads encode at
# once (each encode resets the backend's truncation/padding state): concurrent tasks render under this lock.
TOKENIZER_LOCK = threading.RLock()


def _with_default_system(messages: list[dict]) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        return list(messages)
    return [{"role": "system", "content": local_models.SMOLLM2_SYSTEM_PROMPT}, *messages]


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


def register_builtin(cache_dir: Path, extra_models: dict[str, Path] | None = None) -> None:
    """Register offline tokenizers (built-in and user-folder models) and the SmolLM2 renderer. Idempotent."""
    from tinker_cookbook import renderers, tokenizer_utils

    for name in local_models.model_specs(extra_models):
        tokenizer_utils.register_tokenizer(
            name, functools.partial(_cached_tokenizer, name, str(cache_dir), _freeze(extra_models))
        )
    renderers.register_renderer(
        local_models.SMOLLM2_RENDERER, lambda tokenizer, image_processor=None: _smollm2_renderer_class()(tokenizer)
    )


def _freeze(mapping: dict[str, Path] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in (mapping or {}).items()))


@functools.cache
def _cached_tokenizer(name: str, cache_dir: str, extra: tuple[tuple[str, str], ...]) -> Any:
    return local_models.load_tokenizer(name, Path(cache_dir), {k: Path(v) for k, v in extra})


def renderer_name_for(model_name: str, extra_models: dict[str, Path] | None = None) -> str:
    """The renderer for a model: the local registry's choice, else the cookbook's recommendation."""
    specs = local_models.model_specs(extra_models)
    if model_name in specs:
        return specs[model_name].renderer_name
    from tinker_cookbook import model_info

    return model_info.get_recommended_renderer_name(model_name)


def get_renderer(model_name: str, renderer_name: str | None = None) -> Any:
    """A cookbook renderer over the model's tokenizer (call `register_builtin` first for local models)."""
    from tinker_cookbook import renderers, tokenizer_utils

    with TOKENIZER_LOCK:  # renderers encode their special tokens on construction
        tokenizer = tokenizer_utils.get_tokenizer(model_name)
        return renderers.get_renderer(renderer_name or renderer_name_for(model_name), tokenizer)


def render_pair_tokens(renderer: Any, prompt: Sequence[dict], response: Sequence[dict]) -> tuple[list[int], list[float]]:
    """prompt + response -> (tokens, weights): weight 1 on the response's tokens, 0 on the prompt's."""
    from tinker_cookbook.renderers import TrainOnWhat

    model_input, weights = renderer.build_supervised_example(
        [*prompt, *response], train_on_what=TrainOnWhat.LAST_ASSISTANT_MESSAGE
    )
    return list(model_input.to_ints()), [float(w) for w in weights.tolist()]
