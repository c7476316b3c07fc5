"""Inference from a trained checkpoint: `Sampler(...).complete(prompt)`, the seed guide's `TinkerSampler`."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import tinker

from dpo_core import rendering
from dpo_core.settings import Settings

Message = dict[str, str]


class Sampler:
    """Chat completions from a base model or a `tinker://.../sampler_weights/...` checkpoint.

        sampler = Sampler(model_name="HuggingFaceTB/SmolLM2-135M-Instruct", model_path="tinker://...",
                          temperature=0.7, max_tokens=2048)
        print(sampler.complete("Your prompt here"))

    Hand it a `service_client` to share one; without one it builds its own from `Settings()` (Tinker with a
    key, else a local server over the same checkpoint storage), closed by `close()` or a `with` block.
    """

    def __init__(self, model_name: str, model_path: str | None = None, temperature: float = 0.7,
                 max_tokens: int = 2048, *, top_p: float = 1.0, seed: int | None = None,
                 renderer_name: str | None = None, service_client: tinker.ServiceClient | None = None,
                 settings: Settings | None = None):
        from dpo_core.backend import service_client as open_service_client

        self.model_name, self.model_path = model_name, model_path
        self.temperature, self.max_tokens, self.top_p, self.seed = temperature, max_tokens, top_p, seed
        self._stack = contextlib.ExitStack()
        if service_client is None:
            service_client = self._stack.enter_context(open_service_client(settings or Settings()))
        self.renderer = rendering.get_renderer(model_name, renderer_name)
        client = (service_client.create_sampling_client(model_path=model_path) if model_path
                  else service_client.create_sampling_client(base_model=model_name))
        self._client = client.result() if hasattr(client, "result") else client

    def _prompt(self, prompt: str | Sequence[Message]) -> tinker.ModelInput:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        with rendering.TOKENIZER_LOCK:
            return self.renderer.build_generation_prompt(messages)

    def _params(self, seed: int | None) -> tinker.SamplingParams:
        with rendering.TOKENIZER_LOCK:
            stop = self.renderer.get_stop_sequences()
        return tinker.SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                     seed=self.seed if seed is None else seed, stop=stop)

    def _text(self, tokens: list[int]) -> str:
        from tinker_cookbook.renderers import get_text_content

        with rendering.TOKENIZER_LOCK:
            message, _ = self.renderer.parse_response(tokens)
        return get_text_content(message)

    def complete(self, prompt: str | Sequence[Message], seed: int | None = None) -> str:
        """One completion's text (the renderer's stop sequence ends it and is not included)."""
        return self.complete_many([prompt], num_samples=1, seed=seed)[0][0]

    def complete_many(self, prompts: Sequence[str | Sequence[Message]], num_samples: int = 1,
                      seed: int | None = None) -> list[list[str]]:
        """`num_samples` completions for each prompt, all requests in flight at once."""
        futures = [self._client.sample(self._prompt(p), num_samples, self._params(seed)) for p in prompts]
        return [[self._text(list(s.tokens)) for s in f.result().sequences] for f in futures]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


TinkerSampler = Sampler  # the name the seed guide uses
