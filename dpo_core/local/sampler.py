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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dpo_core.local import ids
from dpo_core.local.budget import Budget, JobInterrupted
from dpo_core.local.checkpoints import CheckpointStore
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
                 merged_cache_size: int = 4, max_snapshots: int = 32, max_snapshots_per_session: int = 8):
        self.store, self.checkpoints, self.counters = store, checkpoints, counters
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
    @torch.no_grad()
    def sample_batch(self, source: SamplerSource, requests: list[SampleRequest]) -> list[dict[str, Any] | Exception]:
        """Serve several sampling requests of one sampler in a single batched generation.

        Decoding a small model on a CPU is bound by reading the weights once per step, so one step for many
        rows costs about what it costs for one: requests queued together share the steps. Rows are left-padded
        (masked; positions counted per row), each sample has its own generator seeded `seed + index`, so a
        request's tokens do not depend on what it was batched with.
        """
        results: list[dict[str, Any] | Exception] = [None] * len(requests)  # type: ignore[list-item]
        live: list[int] = []
        module = self._module(source)
        vocab = module.config.vocab_size
        for index, request in enumerate(requests):
            if not request.prompt:
                results[index] = UserError("the prompt is empty")
            elif request.num_samples < 1:
                results[index] = UserError(f"num_samples must be >= 1, got {request.num_samples}")
            elif max(request.prompt) >= vocab or min(request.prompt) < 0:
                results[index] = UserError(f"prompt token id out of range for {source.base_model} (vocab {vocab})")
            else:
                live.append(index)
        if not live:
            return results
        self.counters["sample_requests"] += len(live)
        device = self.store.device
        # One row per sample; remember which request and which sample index each row is.
        rows = [(i, j) for i in live for j in range(requests[i].num_samples)]
        prompts = [requests[i].prompt for i, _ in rows]
        longest = max(len(p) for p in prompts)
        pad = [longest - len(p) for p in prompts]
        input_ids = torch.zeros((len(rows), longest), dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, tokens in enumerate(prompts):
            input_ids[r, pad[r]:] = torch.tensor(tokens, dtype=torch.long)
            attention[r, pad[r]:] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        input_ids, attention, positions = (t.to(device) for t in (input_ids, attention, positions))
        decoder = getattr(module, module.base_model_prefix)
        head = module.get_output_embeddings()
        out = decoder(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
        hidden, past = out.last_hidden_state, out.past_key_values

        # Prompt logprobs from the prefill of each request's first row.
        for i in live:
            results[i] = self._prompt_logprobs(requests[i], head, hidden, input_ids, rows.index((i, 0)),
                                               pad[rows.index((i, 0))])

        settings = []
        for i, j in rows:
            params = requests[i].params
            seed = params.get("seed")
            max_tokens = params.get("max_tokens")
            temperature = params.get("temperature")
            settings.append({
                "max_tokens": 16 if max_tokens is None else int(max_tokens),
                "temperature": 1.0 if temperature is None else float(temperature),
                "stops": self._stops(source.base_model, params.get("stop")),
                "generator": torch.Generator(device=device).manual_seed(
                    (int(seed) if seed is not None else int.from_bytes(os.urandom(6), "little")) + j),
            })
        first_params = requests[live[0]].params
        top_k = int(first_params.get("top_k") if first_params.get("top_k") is not None else -1)
        top_p = float(first_params.get("top_p") if first_params.get("top_p") is not None else 1.0)
        temperatures = torch.tensor([max(s["temperature"], 1e-6) for s in settings], device=device).unsqueeze(-1)
        greedy = [s["temperature"] <= 0 for s in settings]
        needs_text = any(s["stops"][1] for s in settings)
        tokenizer = self.store.tokenizer(source.base_model) if needs_text else None
        sequences: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        stop_reason = ["length"] * len(rows)
        done = [s["max_tokens"] <= 0 for s in settings]
        next_logits = head(hidden[:, -1]).float()
        steps = max(s["max_tokens"] for s in settings)
        rows_of = {i: [r for r, (owner, _) in enumerate(rows) if owner == i] for i in live}
        for step in range(steps):
            for i in live:  # a request out of time or cancelled ends here, alone; its batch-mates go on
                if not isinstance(results[i], dict) or all(done[r] for r in rows_of[i]):
                    continue  # already failed, or finished: a finished request keeps its result
                problem = requests[i].budget.problem()
                if problem is not None:
                    results[i] = JobInterrupted(problem)
                    for r in rows_of[i]:
                        done[r] = True
            if all(done):
                break
            log_probs = torch.log_softmax(next_logits / temperatures, dim=-1)
            filtered = _filter(log_probs, top_k, top_p).exp()
            greedy_choice = next_logits.argmax(dim=-1)
            chosen = torch.stack([
                greedy_choice[r] if greedy[r] else torch.multinomial(filtered[r], 1, generator=settings[r]["generator"])[0]
                for r in range(len(rows))
            ])
            chosen_lp = log_probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
            for r, token in enumerate(chosen.tolist()):
                if done[r]:
                    continue
                sequences[r].append(token)
                logprobs[r].append(chosen_lp[r])
                stop_ids, stop_strings = settings[r]["stops"]
                if token in stop_ids or (stop_strings and any(
                        text in tokenizer.decode(sequences[r][-32:]) for text in stop_strings)):
                    done[r], stop_reason[r] = True, "stop"
                elif len(sequences[r]) >= settings[r]["max_tokens"]:
                    done[r] = True
            if all(done):
                break
            attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            out = decoder(input_ids=chosen.unsqueeze(-1), attention_mask=attention, position_ids=positions,
                          past_key_values=past, use_cache=True)
            past, next_logits = out.past_key_values, head(out.last_hidden_state[:, -1]).float()
        self.counters["sampled_tokens"] += sum(len(seq) for seq in sequences)
        for i in (i for i in live if isinstance(results[i], dict)):
            results[i]["sequences"] = [
                {"tokens": sequences[r], "logprobs": logprobs[r], "stop_reason": stop_reason[r]}
                for r, (owner, _) in enumerate(rows) if owner == i
            ]
        return results

    def _prompt_logprobs(self, request: SampleRequest, head: Any, hidden: torch.Tensor, input_ids: torch.Tensor,
                         row: int, pad: int) -> dict[str, Any]:
        """The prompt's own logprobs (NaN first, as Tinker) and top-k alternatives, when the request asks."""
        result: dict[str, Any] = {"prompt_logprobs": None, "topk_prompt": None}
        if not (request.prompt_logprobs or request.topk_prompt_logprobs):
            return result
        self.counters["prompt_logprob_requests"] += 1
        self.counters["prompt_logprob_tokens"] += len(request.prompt)
        # Chunk by chunk over the vocabulary-wide logits (`logprobs.py`): a long prompt never holds them all.
        scored = prompt_logprobs(hidden[row, pad:-1], head.weight, input_ids[row, pad + 1:],
                                 top_k=request.topk_prompt_logprobs, bias=getattr(head, "bias", None))
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


def _filter(log_probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask tokens outside top-k / the top-p nucleus (to -inf), row by row."""
    if top_k is not None and 0 < top_k < log_probs.shape[-1]:
        kth = torch.topk(log_probs, top_k, dim=-1).values[..., -1:]
        log_probs = log_probs.masked_fill(log_probs < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_lp, order = torch.sort(log_probs, descending=True, dim=-1)
        cumulative = sorted_lp.exp().cumsum(dim=-1)
        remove = cumulative - sorted_lp.exp() > top_p  # keep the token that crosses top_p
        sorted_lp = sorted_lp.masked_fill(remove, float("-inf"))
        log_probs = torch.full_like(log_probs, float("-inf")).scatter(-1, order, sorted_lp)
    return log_probs

