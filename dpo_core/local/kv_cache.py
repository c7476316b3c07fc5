"""The decoder's KV cache of slots, the attention mask it is read with, and the CUDA graph of a decode step.

A preallocated cache written one column range at a time, for every row at once (a cache concatenated at each
step is copied whole every step). In static mode it always shows its full width and takes the write position
from a tensor, so a decode step has fixed shapes and can be captured as a CUDA graph.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import Cache

from dpo_core.local.validation import UserError

log = logging.getLogger("dpo_core.local")


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


# The attention of a decode step (one query per row) under this name; everything else goes to sdpa unchanged.
DECODE_ATTENTION = "dpo_decode"


def decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """One query per row over the slot cache, grouped-query heads read in place; otherwise HF's sdpa.

    With a mask, HF's sdpa path repeats every key and value head for its group of query heads (a copy of the
    whole visible cache per layer per step) and torch's CPU kernel then takes its math path: at 128 rows x 100
    columns of SmolLM2 that was 12-20 ms per layer against 4-5 ms for this (two batched matmuls over the
    [rows, kv heads, group, dim] view of the query). fp32 only: the math is sdpa's in another order (the scores
    differ by float rounding, ~1e-7 relative); a bf16 matmul would round the scores before the softmax, so
    bf16 (CUDA) keeps sdpa's kernels.
    """
    if (query.shape[2] != 1 or query.dtype != torch.float32 or attention_mask is None
            or attention_mask.dtype != torch.bool or (module.training and dropout > 0)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = dim ** -0.5 if scaling is None else scaling
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim) * scale
    scores = torch.matmul(grouped, key.transpose(-1, -2))  # [rows, kv heads, group, columns]
    scores.masked_fill_(~attention_mask.reshape(rows, 1, 1, -1), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), value)  # [rows, kv heads, group, dim]
    return out.reshape(rows, 1, heads, dim), None  # sdpa's layout: [rows, query, heads, dim]


try:  # the hooks this needs; a transformers without them decodes with sdpa itself (same numbers, slower)
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    _DECODE_ATTENTION_REGISTERED = True
except ImportError as missing:  # pragma: no cover - depends on the installed transformers
    log.info("decode attention not registered (%s): decode steps use sdpa", missing)
    _DECODE_ATTENTION_REGISTERED = False


@contextmanager
def decode_step_attention(config: Any, implementation: str) -> Iterator[None]:
    """Within a decode step of an sdpa model, its attention layers call `decode_attention`.

    Scoped to the step, not set on the model: the base module is shared with the trainer, whose forwards keep
    sdpa's own mask handling (its causal fast path). The engine runs one job at a time on one thread, so no
    other forward sees the switch.
    """
    if implementation != "sdpa" or not _DECODE_ATTENTION_REGISTERED:
        yield
        return
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = implementation


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class GraphSteps:
    """CUDA graphs of the static decode step, one per batch shape; eager when capture fails (logged once)."""

    def __init__(self, decoder: Any):
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
        with decode_step_attention(d.module.config, d.implementation):
            out = d.decoder(input_ids=self.tokens[:, None], position_ids=d.positions[:, None],
                            attention_mask=attention_mask(d.valid[:, None, :], d.implementation, d.dtype),
                            past_key_values=d.cache, use_cache=True)
        return d.head(out.last_hidden_state[:, -1]).float()
