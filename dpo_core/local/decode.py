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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dpo_core.local.budget import Budget, JobInterrupted
from dpo_core.local.decode_layout import NEVER, BatchLayout
from dpo_core.local.draws import counter_uniforms, row_seed, sample_tokens, stop_hits, stop_string_end
from dpo_core.local.kv_cache import GraphSteps, SlotCache, attention_mask, decode_step_attention
from dpo_core.local.prefill import Chunk, Prefiller
from dpo_core.local.validation import UserError



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


class Decoder(BatchLayout):
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
        self.prefiller = Prefiller(self.decoder, self.head, self.implementation, self.dtype, self.device,
                                   self.num_layers, counters, prefill_tokens, prefill_padding)
        self.static = self.device.type == "cuda" if static is None else static
        self.graphs = GraphSteps(self) if (self.static and cuda_graphs and self.device.type == "cuda") else None
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
        for chunk in self.prefiller.chunks([live.job.prompt for live in ready]):
            self._seat(chunk, [ready[i] for i in chunk.indices])

    def _seat(self, chunk: Chunk, lives: list[_Live]) -> None:
        """After a prefill: score the prompts that ask, answer one-token requests, give the rest their rows."""
        for b, live in enumerate(lives):
            if live.job.score_prompt is not None:
                live.result.update(live.job.score_prompt(chunk.prompt_hidden(b)))
                prompt_lp = live.result.get("prompt_logprobs")
                if prompt_lp is not None and not np.isfinite(prompt_lp[1:]).all():
                    self._fail(live, _not_finite("the prompt's logprobs"))
        instant = [b for b, live in enumerate(lives) if not live.answered and live.job.max_tokens <= 1]
        decoding = [b for b, live in enumerate(lives) if not live.answered and live.job.max_tokens > 1]
        if instant:
            self._finish_instant([lives[b] for b in instant], chunk.logits[instant])
        if decoding:
            lengths = torch.tensor([len(lives[b].job.prompt) for b in decoding])
            self._insert([lives[b] for b in decoding], chunk.cache, torch.tensor(decoding), chunk.key_valid[decoding],
                         lengths, chunk.logits[decoding], chunk.key_valid.shape[1])

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
        with decode_step_attention(self.module.config, self.implementation):
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
        """Where a stop string ends in row.tokens[:limit] (`draws.stop_string_end`); remembers what was searched."""
        end = stop_string_end(self.tokenizer().decode, row.tokens, row.checked, limit, row.live.job.stop_strings)
        if end is None:
            row.checked = max(row.checked, limit)
        return end

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
    return UserError(f"the model's logits are not finite (NaN/inf) for {what}: its weights cannot be sampled "
                     "(e.g. a diverged optimizer step); sample an earlier checkpoint or retrain with a smaller "
                     "learning rate")


