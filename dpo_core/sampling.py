"""THE sampling path: render -> sample -> parse (`Sampler`, the seed guide's `TinkerSampler`) and fluency scoring.

Evaluation, pair building, the example script and inference all go through `Sampler`, so a prompt is rendered,
stopped and parsed the same way everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tinker

from dpo_core import rendering
from dpo_core.settings import Settings

Message = dict[str, str]


@dataclass(frozen=True)
class Completion:
    """One sampled response: its text, its tokens, the rendered prompt it continued, and the sampled tokens'
    logprobs under the sampling distribution (None when the service returned none)."""

    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    stop_reason: str = "stop"
    logprobs: list[float] | None = None


class Sampler:
    """Chat completions from a base model or a `tinker://.../sampler_weights/...` checkpoint.

        sampler = Sampler(model_name="HuggingFaceTB/SmolLM2-135M-Instruct", model_path="tinker://...",
                          temperature=0.7, max_tokens=2048)
        print(sampler.complete("Your prompt here"))

    Hand it a `service_client` to share one; without one it builds its own from `Settings()` (Tinker with a
    key, else a local server over the same checkpoint storage), closed by `close()` or a `with` block.
    For a trained run, `Sampler.from_run(run_dir)` takes the model, the final checkpoint and the run's renderer
    from the run folder.
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
        self.renderer_name = renderer_name or rendering.renderer_name_for(model_name)
        self.renderer = rendering.get_renderer(model_name, self.renderer_name)
        client = (service_client.create_sampling_client(model_path=model_path) if model_path
                  else service_client.create_sampling_client(base_model=model_name))
        self._client = client.result()

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "final", **options: Any) -> Sampler:
        """A sampler of a trained run, prompted exactly as its training rendered: the base model and renderer
        from `<run_dir>/config.json`, the `sampler_path` of the checkpoint named `checkpoint` (the last such row
        of `checkpoints.jsonl`; `final` by default). `options` are the constructor's (temperature, max_tokens,
        seed, service_client, ...).

            with Sampler.from_run("experiments/dataset1_smollm2135m_lr0.001_beta0.1_2026-12-01") as sampler:
                print(sampler.complete("Write a haiku about rain."))
        """
        from dpo_core.checkpoints import read_checkpoints
        from dpo_core.records import RunConfig

        run = RunConfig.read(run_dir)
        rows = [r for r in read_checkpoints(run_dir) if r.name == checkpoint and r.sampler_path]
        if not rows:
            names = [r.name for r in read_checkpoints(run_dir) if r.sampler_path]
            raise FileNotFoundError(f"{run_dir} has no checkpoint {checkpoint!r} with a sampler_path in "
                                    f"checkpoints.jsonl (it has: {', '.join(names) or 'none'})")
        if rows[-1].expired():
            raise FileNotFoundError(rows[-1].expired_message(run_dir))
        return cls(run.train_config.model_name, rows[-1].sampler_path, renderer_name=run.renderer_name, **options)

    def _prompt(self, prompt: str | Sequence[Message]) -> tinker.ModelInput:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return self.renderer.build_generation_prompt(messages)

    def _params(self, seed: int | None) -> tinker.SamplingParams:
        stop = self.renderer.get_stop_sequences()
        return tinker.SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                     seed=self.seed if seed is None else seed, stop=stop)

    def _completion(self, prompt_tokens: list[int], sequence: Any) -> Completion:
        from tinker_cookbook.renderers import get_text_content

        tokens = list(sequence.tokens)
        message, _ = self.renderer.parse_response(tokens)
        logprobs = sequence.logprobs
        return Completion(get_text_content(message), tokens, prompt_tokens, sequence.stop_reason,
                          None if logprobs is None else list(logprobs))

    def samples_are_model_logprobs(self) -> bool:
        """Whether the logprobs returned with samples are the model's own token logprobs: at temperature 1 with
        no nucleus, the sampling distribution is the model's, so fluency under this model needs no second pass."""
        return self.temperature == 1.0 and self.top_p == 1.0

    def sample_many(self, prompts: Sequence[str | Sequence[Message]], num_samples: int = 1, seed: int | None = None,
                    *, concurrency: int | None = None, progress: str | None = None) -> list[list[Completion]]:
        """`num_samples` completions (text and tokens) for each prompt, in prompt order.

        Up to `concurrency` requests in flight (all of them when None; the local server batches them into one
        generation); `progress` labels a progress bar over prompts.
        """
        from tqdm import tqdm

        params = self._params(seed)
        inputs = [self._prompt(p) for p in prompts]
        window = concurrency or max(len(inputs), 1)
        results: list[list[Completion]] = [[] for _ in inputs]
        with tqdm(total=len(inputs), desc=progress, unit="prompt", disable=progress is None,
                  dynamic_ncols=True) as bar:

            def collect(index: int, future: Any) -> None:
                prompt_tokens = inputs[index].to_ints()
                results[index] = [self._completion(prompt_tokens, s) for s in future.result().sequences]
                bar.update(1)

            in_flight: list[tuple[int, Any]] = []
            for index, model_input in enumerate(inputs):
                in_flight.append((index, self._client.sample(model_input, num_samples, params)))
                if len(in_flight) >= window:
                    collect(*in_flight.pop(0))
            for index, future in in_flight:
                collect(index, future)
        return results

    def complete(self, prompt: str | Sequence[Message], seed: int | None = None) -> str:
        """One completion's text (the renderer's stop sequence ends it and is not included)."""
        return self.complete_many([prompt], num_samples=1, seed=seed)[0][0]

    def complete_many(self, prompts: Sequence[str | Sequence[Message]], num_samples: int = 1,
                      seed: int | None = None) -> list[list[str]]:
        """`num_samples` completions for each prompt, all requests in flight at once."""
        return [[c.text for c in row] for row in self.sample_many(prompts, num_samples, seed)]

    def mean_logprobs(self, completions: Sequence[Completion]) -> list[float]:
        """Mean token logprob of each completion's response under this sampler's model: a fluency score
        (NaN for an empty response). All requests in flight at once.

        The whole sequence is scored, not only the response (`prompt_logprobs_last_n`, which would let Tinker
        serve the shared prompt from its prefix cache): the local server does not honour that field yet, and
        the SDK then refuses its answer."""
        futures = [self._client.compute_logprobs(tinker.ModelInput.from_ints(c.prompt_tokens + c.tokens))
                   if c.tokens else None for c in completions]
        scores = []
        for completion, future in zip(completions, futures):
            values = future.result()[len(completion.prompt_tokens):] if future is not None else []
            scores.append(float(np.mean(values)) if values else float("nan"))
        return scores

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


TinkerSampler = Sampler  # the name the seed guide uses
