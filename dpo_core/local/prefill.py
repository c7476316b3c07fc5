"""Prefilling the prompts that join a decode batch: each shared prefix once, the rest in chunks of similar length.

A trie over the prompts that arrive together: requests that share a stretch (SmolLM2's default system prompt, a
judge's rubric, one eval prompt scored with each of its samples) get it forwarded once, when that saves at least
`MIN_SHARED_TOKENS` tokens; what follows is prefilled per prompt over a copy of that prefix's cache, prompts of
similar length together (`batching.length_buckets`). Each chunk's cache, hidden states and last logits go back to
the decoder, which scores, samples or seats them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dpo_core.local.batching import length_buckets
from dpo_core.local.kv_cache import SlotCache, attention_mask

MIN_SHARED_TOKENS = 32  # forward tokens a shared prompt prefix must save to get a forward of its own


@dataclass
class Prefix:
    """A prompt prefix forwarded once: its KV (one row) and hidden states [length, H]."""

    length: int
    cache: SlotCache | None = None
    hidden: torch.Tensor | None = None


@dataclass
class Chunk:
    """One prefill forward: prompts `indices` (of those given) after `prefix`, left-padded to `width`."""

    indices: list[int]
    prefix: Prefix
    cache: SlotCache  # [B, H, prefix + width, D]
    hidden: torch.Tensor  # [B, width, H]
    logits: torch.Tensor  # [B, V] fp32, at each prompt's last token
    key_valid: torch.Tensor  # [B, prefix + width] bool: which cache columns hold the prompt (pads do not)
    pads: list[int]

    def prompt_hidden(self, b: int) -> torch.Tensor:
        """Prompt b's hidden states at all of its positions [len(prompt), H]."""
        own = self.hidden[b, self.pads[b]:]
        return own if self.prefix.hidden is None else torch.cat([self.prefix.hidden, own])


class Prefiller:
    """Forwards prompts through a HF decoder (no head) into `SlotCache`s."""

    def __init__(self, decoder: Any, head: Any, implementation: str, dtype: torch.dtype, device: torch.device,
                 num_layers: int, counters: dict[str, int], chunk_tokens: int, max_padding: float):
        self.decoder, self.head = decoder, head
        self.implementation, self.dtype, self.device = implementation, dtype, device
        self.num_layers, self.counters = num_layers, counters
        self.chunk_tokens, self.max_padding = chunk_tokens, max_padding

    def chunks(self, prompts: list[list[int]]) -> Iterator[Chunk]:
        yield from self._group(list(range(len(prompts))), prompts, Prefix(0))

    def _group(self, indices: list[int], prompts: list[list[int]], prefix: Prefix) -> Iterator[Chunk]:
        """The chunks of `indices`, whose prompts all start with `prefix`; longer shared prefixes first."""
        depth = prefix.length
        indices = sorted(indices, key=lambda i: prompts[i])
        alone: list[int] = []
        start = 0
        while start < len(indices):
            end = start + 1
            while end < len(indices) and prompts[indices[end]][depth] == prompts[indices[start]][depth]:
                end += 1
            group, start = indices[start:end], end
            if len(group) > 1:
                # every prompt keeps at least its last token to forward: its logits start the sample
                shared = min(_common_length(prompts[group[0]], prompts[group[-1]]),
                             min(len(prompts[i]) for i in group) - 1)
                if (len(group) - 1) * (shared - depth) >= MIN_SHARED_TOKENS:
                    yield from self._group(group, prompts, self._extend(prefix, prompts[group[0]][:shared]))
                    continue
            alone.extend(group)
        for bucket in length_buckets([len(prompts[i]) - depth for i in alone], self.chunk_tokens, self.max_padding):
            yield self._forward([alone[b] for b in bucket], prompts, prefix)

    def _extend(self, prefix: Prefix, tokens: list[int]) -> Prefix:
        """`prefix` grown to `tokens` by one forward of the new tokens over its cache."""
        new, total = tokens[prefix.length:], len(tokens)
        cache = (SlotCache(self.num_layers, 1, total) if prefix.cache is None
                 else SlotCache.after_prefix(prefix.cache, 1, total))
        visible = (torch.arange(total)[None, :] <= torch.arange(len(new))[:, None] + prefix.length)[None]
        out = self.decoder(input_ids=torch.tensor([new], device=self.device),
                           position_ids=torch.arange(prefix.length, total, device=self.device)[None],
                           attention_mask=attention_mask(visible.to(self.device), self.implementation, self.dtype),
                           past_key_values=cache, use_cache=True)
        self.counters["prefill_tokens"] = self.counters.get("prefill_tokens", 0) + len(new)
        hidden = out.last_hidden_state[0]
        return Prefix(total, cache, hidden if prefix.hidden is None else torch.cat([prefix.hidden, hidden]))

    def _forward(self, indices: list[int], prompts: list[list[int]], prefix: Prefix) -> Chunk:
        """One forward of the prompts after `prefix`, left-padded to the longest."""
        depth = prefix.length
        suffixes = [prompts[i][depth:] for i in indices]
        width = max(len(s) for s in suffixes)
        pads = [width - len(s) for s in suffixes]
        input_ids = torch.zeros((len(indices), width), dtype=torch.long)
        for b, suffix in enumerate(suffixes):
            input_ids[b, pads[b]:] = torch.tensor(suffix, dtype=torch.long)
        columns = torch.arange(width)
        pad_column = torch.tensor(pads)[:, None]
        key_valid = columns[None, :] >= pad_column  # [B, W]
        positions = depth + (columns[None, :] - pad_column).clamp(min=0)
        causal = columns[None, :, None] >= columns[None, None, :]  # [1, q, k]
        # a pad query sees itself only: its output is never used, and a row that sees nothing would be NaN
        visible = causal & (key_valid[:, None, :] | torch.eye(width, dtype=torch.bool)[None])
        if prefix.cache is None:
            cache = SlotCache(self.num_layers, len(indices), width)
        else:
            cache = SlotCache.after_prefix(prefix.cache, len(indices), depth + width)
            visible = torch.cat([visible.new_ones((len(indices), width, depth)), visible], dim=-1)
        out = self.decoder(input_ids=input_ids.to(self.device), position_ids=positions.to(self.device),
                           attention_mask=attention_mask(visible.to(self.device), self.implementation, self.dtype),
                           past_key_values=cache, use_cache=True)
        self.counters["prefill_tokens"] = self.counters.get("prefill_tokens", 0) + sum(len(s) for s in suffixes)
        hidden = out.last_hidden_state
        key_valid = torch.cat([torch.ones((len(indices), depth), dtype=torch.bool), key_valid], dim=1)
        return Chunk(indices, prefix, cache, hidden, self.head(hidden[:, -1]).float(), key_valid, pads)


def _common_length(first: list[int], second: list[int]) -> int:
    """How many leading tokens two prompts share."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return min(len(first), len(second))
