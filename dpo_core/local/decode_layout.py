"""Where a decode batch's rows live: slots of the KV cache and of the per-row tensors, rebuilt when they run out.

Rows are right-aligned at the current column with their own positions, so a prompt of any length joins at any
step; finished rows free their slot, a batch with a quarter of its slots free is compacted, and capacity grows
geometrically (each rebuild copies the cache, so it stays rare). `Decoder` holds the state; this is its layout.
"""

from __future__ import annotations

from typing import Any

import torch

from dpo_core.local.draws import GREEDY_INV_TEMPERATURE
from dpo_core.local.kv_cache import SlotCache, round_up

NEVER = 1 << 62  # "has not ended" in the device's per-row end step


class BatchLayout:
    """The slot bookkeeping of `Decoder` (its attributes: slots, cache, column, first_column, the row tensors)."""

    def _insert(self, lives: list[Any], cache: SlotCache, source_rows: torch.Tensor, key_valid: torch.Tensor,
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

    def _stop_id_tensor(self, jobs: list[Any]) -> torch.Tensor:
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
            columns = round_up(columns, 128)
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
        return round_up(rows, 8 if rows <= 64 else 64) if self.static else rows

