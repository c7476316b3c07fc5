"""Sampling for the local server: sampling sessions, merged-LoRA modules, and batched decoding.

Sampling runs on a copy of the base weights with the LoRA merged in (unmerged was ~30% slower on 2 vCPUs);
the merged copies of the most recently used checkpoints are kept (`merged_cache_size`, one per concurrent
evaluation, else they thrash). Snapshot samplers (`save_weights_and_get_sampling_client()`, taken every step of
an RL or evaluation loop) each hold a copy of the adapter: a session keeps its `max_snapshots_per_session` most
recently used ones and the server `max_snapshots`, the least recently used going first.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dpo_core.local import ids
from dpo_core.local.budget import Budget
from dpo_core.local.checkpoints import CheckpointStore
from dpo_core.local.decode import DecodeJob, Decoder
from dpo_core.local.logprobs import prompt_logprobs
from dpo_core.local.lora_merge import merge_lora
from dpo_core.local.store import ModelStore
from dpo_core.local.trainer import LORA_ALPHA
from dpo_core.local.validation import UserError


@dataclass
class SampleRequest:
    prompt: list[int]
    num_samples: int
    params: dict[str, Any]
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    budget: Budget = field(default_factory=Budget)  # checked between decode steps: deadline and cancel


@dataclass
class SamplerSource:
    """What a sampler samples from: a base model, a saved checkpoint, or a snapshot of live weights."""

    base_model: str
    model_path: str | None = None  # tinker:// sampler or state path
    adapter_state: dict[str, torch.Tensor] | None = None  # ephemeral snapshot
    lora: dict[str, Any] | None = None
    key: str = ""  # identifies the weights: requests with the same key can share a batch

    @classmethod
    def of_base(cls, base_model: str) -> SamplerSource:
        return cls(base_model, key=f"base:{base_model}")

    @classmethod
    def of_checkpoint(cls, checkpoints: CheckpointStore, model_path: str) -> SamplerSource:
        meta = checkpoints.read_meta(model_path)
        return cls(meta["base_model"], model_path=model_path, lora=meta["lora"], key=model_path)


class Sampler:
    """Sampling sessions by id, and the batched generation that serves them."""

    def __init__(self, store: ModelStore, checkpoints: CheckpointStore, counters: dict[str, int],
                 merged_cache_size: int = 4, max_snapshots: int = 32, max_snapshots_per_session: int = 8,
                 sync_every: int = 4):
        self.store, self.checkpoints, self.counters = store, checkpoints, counters
        self.sync_every = sync_every  # decode steps between reads of the sampled tokens
        self.static_cache: bool | None = None  # None: a static KV cache (and CUDA graphs) on CUDA only
        self.merged_cache_size = merged_cache_size
        self.max_snapshots, self.max_snapshots_per_session = max_snapshots, max_snapshots_per_session
        self.sessions: dict[str, SamplerSource] = {}
        self._merged: OrderedDict[str, Any] = OrderedDict()
        self._snapshots: OrderedDict[str, None] = OrderedDict()  # snapshot sampler ids, least recently used first
        self._evicted: OrderedDict[str, str] = OrderedDict()  # recently evicted snapshot ids -> why (bounded)
        self._finite: OrderedDict[str, bool] = OrderedDict()  # weights key -> whether their logits are finite
        # Sessions are added by the HTTP thread (create_sampling_session) and looked up there (asample), added
        # and released by the engine thread (snapshots, session ends): every read-modify of them holds this.
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ sessions
    def create_session(self, sampler_id: str, base_model: str | None, model_path: str | None) -> str:
        if model_path:
            source = SamplerSource.of_checkpoint(self.checkpoints, model_path)
            if base_model and base_model != source.base_model:
                raise UserError(f"{model_path} was trained from {source.base_model}, not {base_model}")
        elif base_model:
            self.store.base(base_model)
            source = SamplerSource.of_base(base_model)
        else:
            raise UserError("create_sampling_session needs base_model or model_path")
        with self._lock:
            self._forget_snapshot(sampler_id)  # a reused id now names this sampler, not an old snapshot
            self.sessions[sampler_id] = source
        return sampler_id

    def add_snapshot(self, sampler_id: str, base_model: str, lora: dict[str, Any],
                     adapter_state: dict[str, torch.Tensor]) -> str:
        """An ephemeral sampler over a copy of a training model's current weights; evicts the least recently
        used snapshots past the session's and the server's caps (requests already queued on them still run)."""
        with self._lock:
            self._forget_snapshot(sampler_id)
            self.sessions[sampler_id] = SamplerSource(base_model, adapter_state=adapter_state, lora=dict(lora),
                                                      key=f"ephemeral:{sampler_id}")
            self._snapshots[sampler_id] = None
            session_id = ids.session_of(sampler_id)
            owned = [s for s in self._snapshots if ids.belongs_to(session_id, s)]
            for oldest in owned[:max(0, len(owned) - self.max_snapshots_per_session)]:
                self._evict(oldest, f"its session keeps its {self.max_snapshots_per_session} most recently used "
                                    "snapshot samplers (DPO_LOCAL_MAX_SNAPSHOTS_PER_SESSION)")
            while len(self._snapshots) > self.max_snapshots:
                self._evict(next(iter(self._snapshots)), f"the server keeps its {self.max_snapshots} most "
                                                         "recently used snapshot samplers (DPO_LOCAL_MAX_SNAPSHOTS)")
        return sampler_id

    def snapshot_count(self, session_id: str | None = None) -> int:
        """Snapshot samplers held, of one session or of all."""
        with self._lock:
            return sum(1 for s in self._snapshots if session_id is None or ids.belongs_to(session_id, s))

    def _evict(self, sampler_id: str, why: str) -> None:
        self._forget_snapshot(sampler_id)
        self._evicted[sampler_id] = why
        while len(self._evicted) > 4096:
            self._evicted.popitem(last=False)

    def _forget_snapshot(self, sampler_id: str) -> None:
        if sampler_id in self._snapshots:
            del self._snapshots[sampler_id]
            key = self.sessions.pop(sampler_id).key
            self._merged.pop(key, None)
            self._finite.pop(key, None)  # the id may name other weights next
        self._evicted.pop(sampler_id, None)

    @torch.no_grad()
    def weights_are_finite(self, source: SamplerSource) -> bool:
        """Whether the source's (merged) weights give finite logits on a few fixed tokens; once per weights.

        Checked before decoding: on CUDA, sampling NaN/inf probabilities is a device-side assert that leaves the
        process's CUDA context unusable for every later request (seen on an H200, torch 2.11), not an exception.
        """
        verdict = self._finite.get(source.key)
        if verdict is None:
            module = self._module(source)
            probe = torch.arange(1, 17, device=self.store.device).unsqueeze(0)
            verdict = bool(torch.isfinite(module(input_ids=probe).logits).all())
            self._finite[source.key] = verdict
            while len(self._finite) > 4096:
                self._finite.popitem(last=False)
        return verdict

    def session(self, sampler_id: str) -> SamplerSource:
        with self._lock:
            if sampler_id not in self.sessions:
                raise UserError(f"unknown sampler {sampler_id}")
            return self.sessions[sampler_id]

    def source(self, sampler_id: str | None, base_model: str | None, model_path: str | None) -> SamplerSource:
        """What an `asample` request samples from: its session, else a checkpoint path, else a base model."""
        if sampler_id:
            with self._lock:
                if sampler_id in self._evicted:
                    raise UserError(f"snapshot sampler {sampler_id!r} was released: {self._evicted[sampler_id]}; "
                                    "take a new one (save_weights_and_get_sampling_client)")
                if sampler_id not in self.sessions:
                    raise UserError(f"unknown sampling session {sampler_id!r}")
                if sampler_id in self._snapshots:
                    self._snapshots.move_to_end(sampler_id)
                return self.sessions[sampler_id]
        if model_path:
            return SamplerSource.of_checkpoint(self.checkpoints, model_path)
        if base_model:
            return SamplerSource.of_base(base_model)
        raise UserError("a sample request needs a sampling session, a model_path or a base_model")

    def release_session(self, session_id: str) -> int:
        """Drop the samplers a finished session created (and the merged weights of its snapshots)."""
        with self._lock:
            owned = [s for s in self.sessions if ids.belongs_to(session_id, s)]
            for sampler_id in owned:
                self._snapshots.pop(sampler_id, None)
                source = self.sessions.pop(sampler_id)
                if source.adapter_state is not None:
                    self._merged.pop(source.key, None)
                    self._finite.pop(source.key, None)
            for sampler_id in [s for s in self._evicted if ids.belongs_to(session_id, s)]:
                del self._evicted[sampler_id]
        return len(owned)

    @staticmethod
    def group_key(source: SamplerSource, params: dict[str, Any]) -> str:
        """Requests with the same key can share one batched generation."""
        top_k = params.get("top_k")
        top_p = params.get("top_p")
        return json.dumps([source.key, -1 if top_k is None else int(top_k), 1.0 if top_p is None else float(top_p)])

    def _module(self, source: SamplerSource) -> Any:
        base = self.store.base(source.base_model)
        if source.model_path is None and source.adapter_state is None:
            return base
        if source.key in self._merged:
            self._merged.move_to_end(source.key)
            return self._merged[source.key]
        state = source.adapter_state
        if state is None:
            state = self.checkpoints.load_adapter(source.model_path, self.store.device)
        merged = copy.deepcopy(base)
        # In fp32 a plain `W += delta`. In bf16 (CUDA) the delta of a few small-LR steps is mostly below the
        # weight's spacing and a bf16 merge would round it away, so each adapted layer becomes a high + low bf16
        # pair holding W + delta to ~16 bits (`lora_merge.py`). Chosen over sampling the peft model unmerged:
        # one extra matmul per adapted layer, against peft's cast + two thin matmuls + scale + add + cast (more
        # kernel launches in a launch-bound small-model decode, ~30% slower on CPU), and the KV cache,
        # activations and unadapted layers stay as they are. The price is reading two bf16 copies of an adapted
        # weight per step, as many bytes as one fp32 copy.
        merge_lora(merged, state, scale=LORA_ALPHA / int(source.lora["rank"]))
        self._merged[source.key] = merged
        while len(self._merged) > self.merged_cache_size:
            self._merged.popitem(last=False)
        return merged

    # ------------------------------------------------------------------ generation
    def decode(self, source: SamplerSource, requests: list[SampleRequest],
               deliver: Callable[[int, dict[str, Any] | Exception], None],
               admit: Callable[[int], list[SampleRequest]] | None = None) -> None:
        """Serve sampling requests of one sampler as one continuous batched generation (`decode.py`).

        Decoding a small model is bound by reading the weights once per step, so one step for many rows costs
        about what it costs for one: requests share the steps, and those `admit(live_rows)` hands over while
        rows decode join at the next step. Each request is answered through `deliver(position, outcome)` as
        soon as its rows are done (positions number `requests`, then the admitted ones in order). A sample's
        tokens depend on its request, seed and index only, never on its batch-mates.
        """
        module = self._module(source)
        first = requests[0].params if requests else {}
        top_k = first.get("top_k")
        top_p = first.get("top_p")
        decoder = Decoder(module, module.config.vocab_size, lambda: self.store.tokenizer(source.base_model),
                          top_k=-1 if top_k is None else int(top_k), top_p=1.0 if top_p is None else float(top_p),
                          counters=self.counters, sync_every=self.sync_every, static=self.static_cache)
        head = module.get_output_embeddings()
        numbered = [(position, self._decode_job(source, request, head, module.config.vocab_size))
                    for position, request in enumerate(requests)]
        admitted = {"next": len(requests)}

        def admit_more(live_rows: int) -> list[tuple[int, DecodeJob | Exception]]:
            more = admit(live_rows)
            start = admitted["next"]
            admitted["next"] += len(more)
            return [(start + i, self._decode_job(source, request, head, module.config.vocab_size))
                    for i, request in enumerate(more)]

        decoder.run(numbered, deliver, admit_more if admit is not None else None)

    def _decode_job(self, source: SamplerSource, request: SampleRequest, head: Any, vocab: int
                    ) -> DecodeJob | Exception:
        """What the decoder needs of one request, or the user error that refuses it."""
        if not request.prompt:
            return UserError("the prompt is empty")
        if request.num_samples < 1:
            return UserError(f"num_samples must be >= 1, got {request.num_samples}")
        if max(request.prompt) >= vocab or min(request.prompt) < 0:
            return UserError(f"prompt token id out of range for {source.base_model} (vocab {vocab})")
        params = request.params
        seed, max_tokens, temperature = params.get("seed"), params.get("max_tokens"), params.get("temperature")
        stop_ids, stop_strings = self._stops(source.base_model, params.get("stop"))
        scores = request.prompt_logprobs or request.topk_prompt_logprobs
        return DecodeJob(
            prompt=list(request.prompt), num_samples=request.num_samples,
            max_tokens=16 if max_tokens is None else int(max_tokens),
            temperature=1.0 if temperature is None else float(temperature),
            seed=int(seed) if seed is not None else int.from_bytes(os.urandom(6), "little"),
            stop_ids=frozenset(stop_ids), stop_strings=tuple(stop_strings), budget=request.budget,
            score_prompt=(lambda hidden: self._prompt_logprobs(request, head, hidden)) if scores else None)

    def _prompt_logprobs(self, request: SampleRequest, head: Any, hidden: torch.Tensor) -> dict[str, Any]:
        """The prompt's own logprobs (NaN first, as Tinker) and top-k alternatives, from its prefill's hidden
        states [len(prompt), H]."""
        self.counters["prompt_logprob_requests"] += 1
        self.counters["prompt_logprob_tokens"] += len(request.prompt)
        # Chunk by chunk over the vocabulary-wide logits (`logprobs.py`): a long prompt never holds them all.
        targets = torch.tensor(request.prompt[1:], dtype=torch.long, device=hidden.device)
        scored = prompt_logprobs(hidden[:-1], head.weight, targets, top_k=request.topk_prompt_logprobs,
                                 bias=getattr(head, "bias", None))
        result: dict[str, Any] = {"prompt_logprobs": None, "topk_prompt": None}
        result["prompt_logprobs"] = np.concatenate([[np.nan], scored.logprobs.cpu().numpy()]).astype(np.float32)
        if request.topk_prompt_logprobs:
            k = request.topk_prompt_logprobs
            pad_ids = torch.full((1, k), -1, dtype=scored.top_ids.dtype, device=scored.top_ids.device)
            pad_vals = torch.full((1, k), float("nan"), device=scored.top_logprobs.device)
            result["topk_prompt"] = (torch.cat([pad_ids, scored.top_ids]).cpu().numpy().astype(np.int32),
                                     torch.cat([pad_vals, scored.top_logprobs]).cpu().numpy().astype(np.float32))
        return result

    def _stops(self, base_model: str, stop: Any) -> tuple[set[int], list[str]]:
        """`None` = the model's end-of-turn tokens; `[]` = never stop early; else the given ids or strings."""
        if stop is None:
            eos = self.store.base(base_model).config.eos_token_id
            stop_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
            tokenizer = self.store.tokenizer(base_model)
            if tokenizer.eos_token_id is not None:
                stop_ids.add(tokenizer.eos_token_id)
            return stop_ids, []
        if isinstance(stop, str):
            stop = [stop]
        stop_ids = {int(s) for s in stop if isinstance(s, int)}
        strings = [s for s in stop if isinstance(s, str) and s]
        return stop_ids, strings

