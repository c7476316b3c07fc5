"""Continuous batched decoding for the local sampler: one sampling op per step for every row, on tensors.

A `Decoder` serves the sampling requests of one set of weights and filters. Each request's prompt is prefilled
once (a prefix shared by several requests once for all of them, the rest in chunks of similar length) and its KV
cache copied into one row per sample; rows then decode together, one forward and one vectorised sampling op per step. Requests that arrive
while rows decode join at the next step (`admit`), finished rows leave at the next sync and their slots are
reused, and every request is answered as soon as its own rows are done.

Why each choice:
- Reproducible per row whatever the batch: the sampled token is an inverse-CDF draw with a uniform that a
  counter-based generator derives from (seed + sample index, step) alone (`counter_uniforms`), so a row's
  randomness does not depend on its batch-mates, on when it joined, or on how many rows share the step.
- A KV cache of preallocated slots (`SlotCache`): one column per step for every row, written in place, instead
  of a cache concatenated (copied whole) at each step. Rows are right-aligned at the current column; each row
  has its own positions, so prompts of any length join a running batch. In static mode the cache always shows
  its full width, which makes the decode step a fixed-shape graph (CUDA graphs).
- The host reads the sampled tokens only every `sync_every` steps. Stop token ids and lengths are checked on
  the device (the step at which each row ended is recorded); stop strings are checked on the text at each sync
  over a decoded tail at least as long as the longest stop string. A row that ended between syncs decodes a few
  wasted steps and is truncated exactly where it ended, so the result equals stopping at once.
- A row whose logits are not finite fails its request with a user error: a sampler never answers NaN logprobs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache

from dpo_core.local.batching import length_buckets
from dpo_core.local.budget import Budget, JobInterrupted
from dpo_core.local.validation import UserError

log = logging.getLogger("dpo_core.local")

NEVER = 1 << 62  # "has not ended" in the device's per-row end step
MIN_SHARED_TOKENS = 32  # forward tokens a shared prompt prefix must save to get a forward of its own
GREEDY_INV_TEMPERATURE = 1e6  # temperature 0 reports logprobs of the distribution at temperature 1e-6


# ----------------------------------------------------------------------------------------------
# Randomness: a counter-based generator
# ----------------------------------------------------------------------------------------------

_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 arrays (wrap-around arithmetic)."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def counter_uniforms(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Uniform draws in (0, 1), one per (row seed, step), each a pure function of its key.

    A counter-based generator: no state is carried from one draw to the next, so a row's draws are the same
    whichever rows share its batch and whenever it joined. Sample i of a request with seed s has the row seed
    s + i (the wire's documented rule), so it equals sample 0 of the same request with seed s + i.
    """
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(np.asarray(seeds, dtype=np.uint64)) ^ np.asarray(steps, dtype=np.uint64))
    return ((key >> _U64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def row_seed(seed: int, sample: int) -> int:
    """Sample `sample`'s seed as the generator's 64-bit key: seed + sample (negative seeds wrap)."""
    return (int(seed) + int(sample)) & ((1 << 64) - 1)


# ----------------------------------------------------------------------------------------------
# The sampling op
# ----------------------------------------------------------------------------------------------


def filter_logprobs(log_probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask tokens outside top-k / the top-p nucleus (to -inf), every row at once."""
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


def sample_tokens(logits: torch.Tensor, inv_temperature: torch.Tensor, uniforms: torch.Tensor,
                  greedy: torch.Tensor | None, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: (tokens [R], their logprobs [R]) from fp32 logits [R, V].

    Inverse-CDF sampling of the filtered distribution at each row's temperature, with each row's own uniform;
    `greedy` rows take the argmax. The logprob is the token's under the temperature-scaled, unfiltered
    distribution (what Tinker reports); NaN for a row whose logits are not finite.
    """
    scaled = logits * inv_temperature[:, None]
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_probs = scaled - log_norm
    filtered = filter_logprobs(log_probs, top_k, top_p)
    cdf = filtered.exp().cumsum_(dim=-1)
    targets = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    if greedy is not None:
        tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    chosen = log_probs.gather(-1, tokens[:, None]).squeeze(-1)
    chosen = torch.where(torch.isfinite(log_norm.squeeze(-1)), chosen, torch.full_like(chosen, float("nan")))
    return tokens, chosen


def stop_hits(tokens: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Which rows sampled one of their stop token ids (stop_ids [R, S], padded with -1)."""
    if stop_ids.shape[1] == 0:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return (tokens[:, None] == stop_ids).any(dim=-1)


# ----------------------------------------------------------------------------------------------
# The KV cache
# ----------------------------------------------------------------------------------------------


class _SlotLayer:
    """One layer's keys and values [rows, heads, columns, head_dim], allocated at the first write."""

    is_compileable = True
    is_sliding = False

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.is_initialized = False


class SlotCache(Cache):
    """A preallocated KV cache written one column range at a time, for every row at once.

    `column` is where the next forward writes; the forward sees columns [`start`, column + q) (all of them in
    `static` mode, whose writes take the column from the tensor `column_index`, so a captured graph replays).
    """

    def __init__(self, num_layers: int, rows: int, columns: int, static: bool = False):
        super().__init__(layers=[_SlotLayer() for _ in range(num_layers)])
        self.rows, self.columns, self.static = rows, columns, static
        self.column, self.start = 0, 0
        self.column_index: torch.Tensor | None = None  # static mode: [1] long on the device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            shape_k = (self.rows, key_states.shape[1], self.columns, key_states.shape[-1])
            shape_v = (self.rows, value_states.shape[1], self.columns, value_states.shape[-1])
            # zeros, never empty(): a masked position still multiplies its value by a zero weight, and garbage
            # NaN there would poison the row
            layer.keys = torch.zeros(shape_k, dtype=key_states.dtype, device=key_states.device)
            layer.values = torch.zeros(shape_v, dtype=value_states.dtype, device=value_states.device)
            layer.is_initialized = True
        width = key_states.shape[-2]
        if self.static:
            layer.keys.index_copy_(2, self.column_index, key_states)
            layer.values.index_copy_(2, self.column_index, value_states)
            return layer.keys, layer.values
        stop = self.column + width
        layer.keys[:, :, self.column:stop] = key_states
        layer.values[:, :, self.column:stop] = value_states
        return layer.keys[:, :, self.start:stop], layer.values[:, :, self.start:stop]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.column

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return (self.columns if self.static else self.column + query_length - self.start), self.start

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.columns

    @property
    def is_compileable(self) -> bool:
        return self.static

    def tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.layers]

    @classmethod
    def after_prefix(cls, prefix: SlotCache, rows: int, columns: int) -> SlotCache:
        """A cache of `rows` x `columns` whose first columns hold `prefix`'s one row, in every row."""
        cache = cls(len(prefix.layers), rows, columns)
        width = prefix.columns
        for layer, (keys, values) in zip(cache.layers, prefix.tensors()):
            layer.keys = keys.new_zeros((rows, keys.shape[1], columns, keys.shape[3]))
            layer.values = values.new_zeros((rows, values.shape[1], columns, values.shape[3]))
            layer.keys[:, :, :width] = keys[:1, :, :width]
            layer.values[:, :, :width] = values[:1, :, :width]
            layer.is_initialized = True
        cache.column = width
        return cache


def attention_mask(visible: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask [R, 1, q, kv] a HF attention takes, from which keys each query sees ([R, q, kv] bool)."""
    mask = visible[:, None]
    if implementation == "sdpa":
        return mask
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise UserError(f"the local sampler decodes with 'sdpa' or 'eager' attention, not {implementation!r}")


# ----------------------------------------------------------------------------------------------
# Requests and rows
# ----------------------------------------------------------------------------------------------


@dataclass
class DecodeJob:
    """One sampling request, resolved by the sampler: what the decoder needs and nothing else."""

    prompt: list[int]
    num_samples: int
    max_tokens: int
    temperature: float
    seed: int
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    budget: Budget
    # the prompt's own logprobs etc. from its prefill's hidden states [len(prompt), H]: the result's first fields
    score_prompt: Callable[[torch.Tensor], dict[str, Any]] | None = None


@dataclass
class _Prefix:
    """A prompt prefix prefilled once for every request that starts with it: its KV (one row) and hidden states."""

    length: int
    cache: SlotCache | None = None
    hidden: torch.Tensor | None = None  # [length, H]


@dataclass
class _Row:
    live: _Live
    sample: int
    seed: int  # the generator's key for this row: `row_seed(request seed, sample)`
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    count: int = 0  # tokens sampled so far (the host's mirror of the device's count)
    window_from: int = 0  # this row's first step in the current sync window
    checked: int = 0  # tokens already searched for stop strings
    finite_upto: int = 0  # logprobs already checked to be finite
    reason: str | None = None  # set when the row has ended: "stop" or "length"


@dataclass
class _Live:
    position: int
    job: DecodeJob
    result: dict[str, Any]
    rows: list[_Row] = field(default_factory=list)
    answered: bool = False


Admit = Callable[[int], list[tuple[int, "DecodeJob | Exception"]]]
Deliver = Callable[[int, "dict[str, Any] | Exception"], None]


class Decoder:
    """Decodes the requests it is given and those `admit` hands it while running; answers each via `deliver`."""

    def __init__(self, module: Any, vocab_size: int, tokenizer: Callable[[], Any], top_k: int, top_p: float,
                 counters: dict[str, int], sync_every: int = 4, prefill_tokens: int = 4096,
                 prefill_padding: float = 0.15, static: bool | None = None, cuda_graphs: bool = True):
        self.module = module
        self.decoder = getattr(module, module.base_model_prefix)
        self.head = module.get_output_embeddings()
        config = module.config
        for kind in getattr(config, "layer_types", None) or ():
            if kind != "full_attention":
                raise UserError(f"the local sampler decodes full-attention layers only; this model has {kind!r}")
        self.implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        self.num_layers = config.num_hidden_layers
        parameter = next(module.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.vocab_size, self.tokenizer = vocab_size, tokenizer
        self.top_k, self.top_p = top_k, top_p
        self.counters = counters
        self.sync_every = max(1, sync_every)
        self.prefill_tokens, self.prefill_padding = prefill_tokens, prefill_padding
        self.static = self.device.type == "cuda" if static is None else static
        self.graphs = _GraphSteps(self) if (self.static and cuda_graphs and self.device.type == "cuda") else None
        self.deliver: Deliver = lambda position, outcome: None
        # the batch: one slot per row; `None` = free
        self.slots: list[_Row | None] = []
        self.cache: SlotCache | None = None
        self.column, self.first_column = 0, 0
        self.next_tokens: torch.Tensor | None = None
        self.window: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def run(self, jobs: list[tuple[int, DecodeJob | Exception]], deliver: Deliver, admit: Admit | None = None) -> None:
        """Decode until every request given or admitted is answered and `admit` has nothing more.

        `admit(live_rows)` is asked before every step for requests to join (positions continue the numbering);
        `deliver(position, result or error)` answers each request once, as soon as it is done.
        """
        self.deliver = deliver
        pending = list(jobs)
        while True:
            if pending:
                self._start(pending)
            if not self._live_rows():
                pending = admit(0) if admit else []
                if not pending:
                    return
                continue
            self._compact_if_sparse()
            self._sample()
            if len(self.window) >= self.sync_every or self._someone_reached_max_tokens():
                self._sync()
            if self._live_rows() and self.column >= self.cache.columns:
                self._sync()
                if self._live_rows():
                    self._rebuild(keep_free=False)
            if self._live_rows():
                self._forward()
            pending = admit(self._live_rows()) if admit else []

    def _live_rows(self) -> int:
        return sum(1 for row in self.slots if row is not None and row.reason is None)

    def _someone_reached_max_tokens(self) -> bool:
        return any(row is not None and row.reason is None and row.count >= row.live.job.max_tokens
                   for row in self.slots)

    # ------------------------------------------------------------------ admission and prefill
    def _start(self, jobs: list[tuple[int, DecodeJob | Exception]]) -> None:
        """Prefill new requests (similar lengths together) and give each sample a row."""
        if self.window:
            self._sync()  # rows keep their slots within a window: settle it before slots move
        ready: list[_Live] = []
        for position, job in jobs:
            if isinstance(job, Exception):
                self.deliver(position, job)
                continue
            problem = job.budget.problem()
            if problem is not None:
                self.deliver(position, JobInterrupted(problem))
                continue
            self.counters["sample_requests"] += 1
            live = _Live(position, job, {"prompt_logprobs": None, "topk_prompt": None})
            live.rows = [_Row(live, sample, row_seed(job.seed, sample)) for sample in range(job.num_samples)]
            ready.append(live)
        if ready:
            self._prefill_group(ready, _Prefix(0))

    def _prefill_group(self, lives: list[_Live], prefix: _Prefix) -> None:
        """Prefill `lives`, whose prompts all start with `prefix`, forwarding each longer common prefix once.

        A trie over the prompts: requests that share more than `prefix` (the same system prompt, a judge's
        rubric, one eval prompt scored with each of its samples) get that stretch prefilled once, when doing so
        saves at least `MIN_SHARED_TOKENS` tokens of forward; the rest is prefilled per request.
        """
        depth = prefix.length
        lives = sorted(lives, key=lambda live: live.job.prompt)
        alone: list[_Live] = []
        start = 0
        while start < len(lives):
            end = start + 1
            token = lives[start].job.prompt[depth]
            while end < len(lives) and lives[end].job.prompt[depth] == token:
                end += 1
            group = lives[start:end]
            start = end
            if len(group) > 1:
                # every prompt keeps at least its last token to forward: its logits start the sample
                shared = min(_common_length(group[0].job.prompt, group[-1].job.prompt),
                             min(len(live.job.prompt) for live in group) - 1)
                if (len(group) - 1) * (shared - depth) >= MIN_SHARED_TOKENS:
                    self._prefill_group(group, self._extend(prefix, group[0].job.prompt[:shared]))
                    continue
            alone.extend(group)
        for chunk in self._prefill_chunks(alone, depth):
            self._prefill(chunk, prefix)

    def _extend(self, prefix: _Prefix, tokens: list[int]) -> _Prefix:
        """`prefix` grown to `tokens` by one forward of the new tokens over its cache."""
        new = tokens[prefix.length:]
        total = len(tokens)
        if prefix.cache is None:
            cache = SlotCache(self.num_layers, 1, total)
        else:
            cache = SlotCache.after_prefix(prefix.cache, 1, total)
        queries = torch.arange(len(new))[:, None]
        keys = torch.arange(total)[None, :]
        visible = (keys <= queries + prefix.length)[None]
        out = self.decoder(input_ids=torch.tensor([new], device=self.device),
                           position_ids=torch.arange(prefix.length, total, device=self.device)[None],
                           attention_mask=attention_mask(visible.to(self.device), self.implementation, self.dtype),
                           past_key_values=cache, use_cache=True)
        self.counters["prefill_tokens"] = self.counters.get("prefill_tokens", 0) + len(new)
        hidden = out.last_hidden_state[0]
        return _Prefix(total, cache, hidden if prefix.hidden is None else torch.cat([prefix.hidden, hidden]))

    def _prefill_chunks(self, lives: list[_Live], depth: int) -> list[list[_Live]]:
        """Longest first; a chunk takes prompts while its padding stays small and its tokens under budget."""
        groups = length_buckets([len(live.job.prompt) - depth for live in lives], self.prefill_tokens,
                                max_padding=self.prefill_padding)
        return [[lives[i] for i in group] for group in groups]

    def _prefill(self, chunk: list[_Live], prefix: _Prefix) -> None:
        """One forward of the chunk's prompts after `prefix` (left-padded to the longest), then each request's
        first token or its rows in the batch."""
        depth = prefix.length
        width = len(chunk[0].job.prompt) - depth
        lengths = torch.tensor([len(lv.job.prompt) for lv in chunk])
        pads = width - (lengths - depth)
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, live in enumerate(chunk):
            input_ids[b, int(pads[b]):] = torch.tensor(live.job.prompt[depth:], dtype=torch.long)
        columns = torch.arange(width)
        key_valid = columns[None, :] >= pads[:, None]  # [B, W]
        positions = depth + (columns[None, :] - pads[:, None]).clamp(min=0)
        causal = columns[None, :, None] >= columns[None, None, :]  # [1, q, k]
        # a pad query sees itself only: its output is never used, and a row that sees nothing would be NaN
        visible = causal & (key_valid[:, None, :] | torch.eye(width, dtype=torch.bool)[None])
        if prefix.cache is None:
            cache = SlotCache(self.num_layers, len(chunk), width)
        else:
            cache = SlotCache.after_prefix(prefix.cache, len(chunk), depth + width)
            visible = torch.cat([visible.new_ones((len(chunk), width, depth)), visible], dim=-1)
        out = self.decoder(input_ids=input_ids.to(self.device), position_ids=positions.to(self.device),
                           attention_mask=attention_mask(visible.to(self.device), self.implementation, self.dtype),
                           past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state
        self.counters["prefill_tokens"] = self.counters.get("prefill_tokens", 0) + int((lengths - depth).sum())
        logits = self.head(hidden[:, -1]).float()
        for b, live in enumerate(chunk):
            if live.job.score_prompt is not None:
                own = hidden[b, int(pads[b]):]
                live.result.update(live.job.score_prompt(own if prefix.hidden is None
                                                         else torch.cat([prefix.hidden, own])))
                prompt_lp = live.result.get("prompt_logprobs")
                if prompt_lp is not None and not np.isfinite(prompt_lp[1:]).all():
                    self._fail(live, _not_finite("the prompt's logprobs"))
        decoding = [b for b, live in enumerate(chunk)
                    if not live.answered and live.job.max_tokens > 1]
        instant = [b for b, live in enumerate(chunk)
                   if not live.answered and live.job.max_tokens <= 1]
        if instant:
            self._finish_instant([chunk[b] for b in instant], logits[instant])
        if decoding:
            block_valid = torch.cat([torch.ones((len(chunk), depth), dtype=torch.bool), key_valid], dim=1)
            self._insert([chunk[b] for b in decoding], cache, torch.tensor(decoding), block_valid[decoding],
                         lengths[decoding], logits[decoding], depth + width)

    def _finish_instant(self, lives: list[_Live], logits: torch.Tensor) -> None:
        """Requests of at most one token (scoring): sampled from the prefill, never given a cache row."""
        rows = [row for live in lives for row in live.rows]
        if not rows:
            return
        expand = torch.tensor([i for i, live in enumerate(lives) for _ in live.rows], device=self.device)
        tokens, logprobs = self._sample_rows(rows, logits.index_select(0, expand))
        for row, token, logprob in zip(rows, tokens.tolist(), logprobs.tolist()):
            if row.live.job.max_tokens >= 1:
                row.tokens.append(token)
                row.logprobs.append(logprob)
                row.count = 1
            self._settle(row, end=len(row.tokens))
        for live in lives:
            self._answer_if_done(live)

    def _insert(self, lives: list[_Live], cache: SlotCache, source_rows: torch.Tensor, key_valid: torch.Tensor,
                lengths: torch.Tensor, logits: torch.Tensor, width: int) -> None:
        """Copy each request's prefilled KV into one free slot per sample, right-aligned at the current column."""
        rows = [row for live in lives for row in live.rows]
        self._make_room(len(rows), width, max(live.job.max_tokens for live in lives), template=cache)
        free = [slot for slot, row in enumerate(self.slots) if row is None]
        slots = free[:len(rows)]
        expand = torch.tensor([i for i, live in enumerate(lives) for _ in live.rows])
        slot_index = torch.tensor(slots, device=self.device)
        from_rows = source_rows[expand].to(self.device)
        start = self.column - width
        self.first_column = min(self.first_column, start)
        for (keys, values), (new_keys, new_values) in zip(self.cache.tensors(), cache.tensors()):
            keys[slot_index, :, start:self.column] = new_keys.index_select(0, from_rows)
            values[slot_index, :, start:self.column] = new_values.index_select(0, from_rows)
        self.valid[slot_index] = False
        self.valid[slot_index, start:self.column] = key_valid[expand].to(self.device)
        self.positions[slot_index] = lengths[expand].to(self.device)
        self.logits[slot_index] = logits.index_select(0, expand.to(self.device))
        jobs = [row.live.job for row in rows]
        self.inv_temperature[slot_index] = torch.tensor(
            [GREEDY_INV_TEMPERATURE if j.temperature <= 0 else 1.0 / j.temperature for j in jobs],
            dtype=torch.float32, device=self.device)
        self.greedy[slot_index] = torch.tensor([j.temperature <= 0 for j in jobs], device=self.device)
        self.max_tokens[slot_index] = torch.tensor([j.max_tokens for j in jobs], device=self.device)
        self.counts[slot_index] = 0
        self.ended_at[slot_index] = NEVER
        stop_ids = self._stop_id_tensor(jobs)
        self.stop_ids[slot_index] = stop_ids
        for slot, row in zip(slots, rows):
            row.window_from = len(self.window)
            self.slots[slot] = row

    def _stop_id_tensor(self, jobs: list[DecodeJob]) -> torch.Tensor:
        """[len(jobs), S] stop ids, padded with -1; widens the batch's table when a job has more."""
        width = max([len(j.stop_ids) for j in jobs] + [self.stop_ids.shape[1]])
        if width > self.stop_ids.shape[1]:
            self.stop_ids = torch.cat([self.stop_ids, self.stop_ids.new_full(
                (self.stop_ids.shape[0], width - self.stop_ids.shape[1]), -1)], dim=1)
        table = torch.full((len(jobs), width), -1, dtype=torch.long)
        for i, job in enumerate(jobs):
            ids = sorted(job.stop_ids)
            table[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return table.to(self.device)

    # ------------------------------------------------------------------ the batch's tensors
    def _make_room(self, new_rows: int, width: int, max_tokens: int, template: SlotCache) -> None:
        """Enough free slots for `new_rows`, the current column at least `width`, room for the next write."""
        free = sum(1 for row in self.slots if row is None)
        if self.cache is not None and free >= new_rows and self.column >= width and self.column < self.cache.columns:
            return
        self._rebuild(extra_rows=max(0, new_rows - free), min_column=width, next_tokens=max_tokens,
                      template=template)

    def _rebuild(self, extra_rows: int = 0, min_column: int = 0, next_tokens: int = 1, keep_free: bool = True,
                 template: SlotCache | None = None) -> None:
        """New buffers holding the live rows (and the free slots if `keep_free`) plus `extra_rows`: columns no
        live row uses dropped, the current column at least `min_column`, and room for the next writes.

        A copy of the cache, so it happens rarely: when rows or columns run out (capacity then grows
        geometrically) or when a quarter of the slots are free.
        """
        live_slots = [slot for slot, row in enumerate(self.slots) if row is not None and row.reason is None]
        keep = [slot for slot, row in enumerate(self.slots) if keep_free or slot in live_slots]
        if self.cache is not None and live_slots:
            used = self.valid.index_select(0, torch.tensor(live_slots, device=self.device))[:, :self.column]
            used_columns = used.any(dim=0).nonzero()
            lead = int(used_columns[0]) if len(used_columns) else self.column
        else:
            lead = self.column
        span = self.column - lead
        column = max(span, min_column)
        remaining = max([next_tokens] + [row.live.job.max_tokens - row.count for row in self.slots
                                         if row is not None and row.reason is None])
        headroom = min(max(remaining, 1), max(64, column))  # grows geometrically; never more than needed
        rows, columns = self._rows_for(len(keep) + extra_rows), column + headroom
        if self.static:  # fixed shapes for captured graphs: few distinct sizes
            columns = _round_up(columns, 128)
        first = column - span
        keep_index = torch.tensor(keep, dtype=torch.long, device=self.device)
        shapes = self.cache if self.cache is not None and self.cache.layers[0].is_initialized else template
        new_cache = SlotCache(self.num_layers, rows, columns, static=self.static)
        for layer, (keys, values) in zip(new_cache.layers, shapes.tensors()):
            layer.keys = keys.new_zeros((rows, keys.shape[1], columns, keys.shape[3]))
            layer.values = values.new_zeros((rows, values.shape[1], columns, values.shape[3]))
            layer.is_initialized = True
            if shapes is self.cache and keep and span:
                layer.keys[:len(keep), :, first:column] = keys.index_select(0, keep_index)[:, :, lead:self.column]
                layer.values[:len(keep), :, first:column] = values.index_select(0, keep_index)[:, :, lead:self.column]
        fresh = self.cache is None

        def moved(name: str, fill: Any, dtype: torch.dtype, shape: tuple[int, ...] = ()) -> torch.Tensor:
            tensor = torch.full((rows,) + shape, fill, dtype=dtype, device=self.device)
            if not fresh and keep:
                tensor[:len(keep)] = getattr(self, name).index_select(0, keep_index)
            return tensor

        valid = torch.zeros((rows, columns), dtype=torch.bool, device=self.device)
        if not fresh and keep and span:
            valid[:len(keep), first:column] = self.valid.index_select(0, keep_index)[:, lead:self.column]
        self.positions = moved("positions", 0, torch.long)
        self.inv_temperature = moved("inv_temperature", 1.0, torch.float32)
        self.greedy = moved("greedy", False, torch.bool)
        self.max_tokens = moved("max_tokens", 0, torch.long)
        self.counts = moved("counts", 0, torch.long)
        self.ended_at = moved("ended_at", NEVER, torch.long)
        self.stop_ids = moved("stop_ids", -1, torch.long, (0 if fresh else self.stop_ids.shape[1],))
        self.logits = moved("logits", 0.0, torch.float32, (self.vocab_size,))
        if self.next_tokens is not None:
            self.next_tokens = moved("next_tokens", 0, torch.long)
        self.valid = valid
        self.slots = [self.slots[slot] for slot in keep] + [None] * (rows - len(keep))
        self.cache, self.column, self.first_column = new_cache, column, first
        if self.static:
            self.cache.column_index = torch.tensor([column], dtype=torch.long, device=self.device)
        if self.graphs is not None:
            self.graphs.reset()

    def _compact_if_sparse(self) -> None:
        """Drop free slots when that shrinks the batch by a quarter (each slot costs compute at every step)."""
        if self.cache is None or self.window:
            return
        used = sum(1 for row in self.slots if row is not None)
        target = self._rows_for(used)
        if target * 4 <= 3 * len(self.slots):
            self._rebuild(keep_free=False)

    def _rows_for(self, rows: int) -> int:
        """The batch size for `rows` rows: exact, or in static mode one of few sizes (one graph each)."""
        return _round_up(rows, 8 if rows <= 64 else 64) if self.static else rows

    # ------------------------------------------------------------------ one step
    def _sample_rows(self, rows: list[_Row], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling op over `rows` (each at its own next step), logits [len(rows), V]."""
        jobs = [row.live.job for row in rows]
        uniforms = counter_uniforms(np.array([row.seed for row in rows], dtype=np.uint64),
                                    np.array([row.count for row in rows], dtype=np.uint64))
        inv_temperature = torch.tensor([GREEDY_INV_TEMPERATURE if j.temperature <= 0 else 1.0 / j.temperature
                                        for j in jobs], dtype=torch.float32, device=self.device)
        greedy = torch.tensor([j.temperature <= 0 for j in jobs], device=self.device)
        return sample_tokens(logits, inv_temperature, torch.from_numpy(uniforms).to(self.device),
                             greedy if bool(greedy.any()) else None, self.top_k, self.top_p)

    def _sample(self) -> None:
        rows = self.slots
        live = [row is not None and row.reason is None for row in rows]
        uniforms = counter_uniforms(np.array([row.seed if row is not None else 0 for row in rows], dtype=np.uint64),
                                    np.array([row.count if row is not None else 0 for row in rows], dtype=np.uint64))
        any_greedy = any(row is not None and row.live.job.temperature <= 0 for row in rows)
        tokens, logprobs = sample_tokens(self.logits, self.inv_temperature,
                                         torch.from_numpy(uniforms).to(self.device, non_blocking=True),
                                         self.greedy if any_greedy else None, self.top_k, self.top_p)
        self.counts += 1
        ended = (stop_hits(tokens, self.stop_ids) | (self.counts >= self.max_tokens)) & (self.ended_at == NEVER)
        self.ended_at = torch.where(ended, self.counts, self.ended_at)
        self.window.append((tokens, logprobs))
        self.next_tokens = tokens
        for row, is_live in zip(rows, live):
            if is_live:
                row.count += 1

    def _forward(self) -> None:
        if self.graphs is not None and self.graphs.step(self.next_tokens):
            return
        column = self.column
        self.valid[:, column] = True
        self.cache.column = column
        if self.static:
            self.cache.column_index.fill_(column)
            self.cache.start, visible = 0, self.valid
        else:  # read only the columns some row uses
            self.cache.start = self.first_column
            visible = self.valid[:, self.first_column:column + 1]
        out = self.decoder(input_ids=self.next_tokens[:, None], position_ids=self.positions[:, None],
                           attention_mask=attention_mask(visible[:, None, :], self.implementation, self.dtype),
                           past_key_values=self.cache, use_cache=True)
        self.logits = self.head(out.last_hidden_state[:, -1]).float()
        self.positions += 1
        self.column += 1

    # ------------------------------------------------------------------ host side
    def _sync(self) -> None:
        """Read the window's tokens, end rows (stop ids, lengths, stop strings, budgets), answer finished requests."""
        if not self.window:
            return
        tokens = torch.stack([t for t, _ in self.window], dim=1).cpu().numpy()
        logprobs = torch.stack([lp for _, lp in self.window], dim=1).cpu().numpy()
        ended_at = self.ended_at.cpu().numpy()
        self.window = []
        touched: dict[int, _Live] = {}
        for slot, row in enumerate(self.slots):
            if row is None or row.reason is not None:
                continue
            take = slice(row.window_from, None)
            row.tokens.extend(tokens[slot, take].tolist())
            row.logprobs.extend(logprobs[slot, take].tolist())
            row.window_from = 0
            self._settle(row, end=int(min(ended_at[slot], len(row.tokens))) if ended_at[slot] < NEVER else None)
            touched[id(row.live)] = row.live
        for live in touched.values():
            if not live.answered:
                problem = live.job.budget.problem()
                if problem is not None:
                    self._fail(live, JobInterrupted(problem))
            self._answer_if_done(live)
        freed = [slot for slot, row in enumerate(self.slots)
                 if row is not None and (row.reason is not None or row.live.answered)]
        for slot in freed:
            self.slots[slot] = None
        if freed:
            self.valid[torch.tensor(freed, device=self.device)] = False

    def _settle(self, row: _Row, end: int | None) -> None:
        """End `row` at the first of: its device-detected end (stop id or max_tokens), a stop string; a
        non-finite logprob before that fails its request."""
        job = row.live.job
        by_string = None
        if job.stop_strings:
            by_string = self._stop_string_end(row, end if end is not None else len(row.tokens))
            if by_string is not None:
                end = by_string
        upto = len(row.logprobs) if end is None else end
        if not all(math.isfinite(lp) for lp in row.logprobs[row.finite_upto:upto]):
            self._fail(row.live, _not_finite(f"sample {row.sample}"))
            return
        row.finite_upto = upto
        if end is None:
            return
        del row.tokens[end:], row.logprobs[end:]
        stopped = by_string is not None or (bool(row.tokens) and row.tokens[-1] in job.stop_ids)
        row.reason = "stop" if stopped else "length"

    def _stop_string_end(self, row: _Row, limit: int) -> int | None:
        """The number of tokens up to and including the one that completes a stop string, or None.

        Searches a decoded tail that reaches back more than the longest stop string's length before the
        tokens not yet searched, so a string of any length is found wherever it ends.
        """
        stops = row.live.job.stop_strings
        reach = max(len(s) for s in stops) + 8
        checked = row.checked
        if limit <= checked:
            return None
        tokenizer = self.tokenizer()
        start = max(0, checked - reach)
        while start > 0 and len(tokenizer.decode(row.tokens[start:checked])) < reach:
            start = max(0, start - reach)
        if not any(s in tokenizer.decode(row.tokens[start:limit]) for s in stops):
            row.checked = limit
            return None
        low, high = checked + 1, limit  # the shortest prefix that holds a stop string
        while low < high:
            middle = (low + high) // 2
            if any(s in tokenizer.decode(row.tokens[start:middle]) for s in stops):
                high = middle
            else:
                low = middle + 1
        return low

    def _fail(self, live: _Live, error: Exception) -> None:
        if live.answered:
            return
        live.answered = True
        for row in live.rows:
            if row.reason is None:
                row.reason = "failed"
        self.deliver(live.position, error)

    def _answer_if_done(self, live: _Live) -> None:
        if live.answered or any(row.reason is None for row in live.rows):
            return
        live.answered = True
        self.counters["sampled_tokens"] += sum(len(row.tokens) for row in live.rows)
        live.result["sequences"] = [{"tokens": row.tokens, "logprobs": row.logprobs, "stop_reason": row.reason}
                                    for row in live.rows]
        self.deliver(live.position, live.result)


def _not_finite(what: str) -> UserError:
    return UserError(f"the model's logits are not finite (NaN or inf) for {what}: its weights cannot be sampled "
                     "(e.g. a diverged optimizer step); sample an earlier checkpoint or retrain with a smaller "
                     "learning rate")


def _common_length(first: list[int], second: list[int]) -> int:
    """How many leading tokens two prompts share."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return min(len(first), len(second))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _GraphSteps:
    """CUDA graphs of the static decode step, one per batch shape; eager when capture fails (logged once)."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.graph: Any = None
        self.tokens: torch.Tensor | None = None
        self.failed = False

    def reset(self) -> None:
        self.graph, self.tokens = None, None

    def step(self, tokens: torch.Tensor) -> bool:
        """Replay (capturing first if needed) the decode step for `tokens`; False when graphs are off."""
        if self.failed:
            return False
        d = self.decoder
        if self.graph is None:
            try:
                self._capture(tokens)
            except Exception as exc:  # noqa: BLE001 - any capture problem falls back to the eager step
                log.warning("CUDA graph capture of the decode step failed, decoding eagerly: %s", exc)
                self.failed, self.graph = True, None
                return False
        self.tokens.copy_(tokens)
        d.cache.column_index.fill_(d.column)
        d.cache.column = d.column
        self.graph.replay()
        d.logits = self.logits
        d.positions += 1
        d.column += 1
        return True

    def _capture(self, tokens: torch.Tensor) -> None:
        # The warm-ups and the capture write the current column exactly as the replay will, so nothing needs
        # restoring afterwards.
        d = self.decoder
        self.tokens = tokens.clone()
        d.cache.column_index.fill_(d.column)
        d.cache.column, d.cache.start = d.column, 0
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(2):
                self.logits = self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._body()
        self.graph = graph

    def _body(self) -> torch.Tensor:
        d = self.decoder
        d.valid.index_fill_(1, d.cache.column_index, True)
        out = d.decoder(input_ids=self.tokens[:, None], position_ids=d.positions[:, None],
                        attention_mask=attention_mask(d.valid[:, None, :], d.implementation, d.dtype),
                        past_key_values=d.cache, use_cache=True)
        return d.head(out.last_hidden_state[:, -1]).float()
