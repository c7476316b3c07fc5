"""Strict validation of a preference dataset, and its `ValidationReport` (soft problems as warnings, statistics).

`validate` loads with `dpo_core.data`, refuses hard failures with a `DatasetError` naming the file, row and
column with a hint, and with a tokenizer also checks token counts against `max_length` exactly as training renders.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_core.data import (DEFAULT_DUPLICATE_THRESHOLD, REQUIRED_COLUMNS, DatasetError, PreferencePair, TokenizePair,
                           load_pairs, normalised_text, read_table)


@dataclass
class ValidationReport:
    """What validation found; `warnings` are soft problems that do not stop training."""

    path: str
    rows: int
    unique_prompts: int
    pairs_per_prompt: dict[str, float]
    length_chars: dict[str, dict[str, float]]
    duplicates: int
    columns: list[str]
    length_tokens: dict[str, dict[str, float]] | None = None
    max_length: int | None = None
    truncated_rows: int | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def format(self) -> str:
        """A plain-text summary for the console."""
        lines = [
            f"dataset: {self.path}",
            f"rows: {self.rows}   unique prompts: {self.unique_prompts}   duplicates: {self.duplicates}",
            "pairs per prompt: " + _fmt_stats(self.pairs_per_prompt),
        ]
        for column, stats in self.length_chars.items():
            lines.append(f"{column} length (chars): {_fmt_stats(stats)}")
        if self.length_tokens:
            for column, stats in self.length_tokens.items():
                lines.append(f"{column} length (tokens): {_fmt_stats(stats)}")
        if self.max_length is not None:
            lines.append(f"rows truncated at max_length={self.max_length}: {self.truncated_rows}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        lines.append("valid: yes")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        rows = [
            ("file", self.path), ("rows", self.rows), ("unique prompts", self.unique_prompts),
            ("pairs per prompt", _fmt_stats(self.pairs_per_prompt)), ("duplicates", self.duplicates),
        ]
        rows += [(f"{c} chars", _fmt_stats(s)) for c, s in self.length_chars.items()]
        if self.length_tokens:
            rows += [(f"{c} tokens", _fmt_stats(s)) for c, s in self.length_tokens.items()]
        if self.max_length is not None:
            rows.append((f"truncated at {self.max_length}", self.truncated_rows))
        rows += [("warning", w) for w in self.warnings]
        return "| check | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _fmt_stats(stats: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0}
    return {
        "min": min(values), "mean": float(statistics.fmean(values)),
        "median": float(statistics.median(values)), "max": max(values),
    }


def validate(
    path: Path,
    *,
    max_length: int | None = None,
    tokenize_pair: TokenizePair | None = None,
    duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
) -> tuple[list[PreferencePair], ValidationReport]:
    """Load, check and summarise a dataset. Raises DatasetError on the first hard failure."""
    path = Path(path)
    table = read_table(path)
    pairs = load_pairs(path, table)

    keys = [(normalised_text(p.prompt), normalised_text(p.chosen), normalised_text(p.rejected)) for p in pairs]
    seen: dict[tuple[str, str, str], int] = {}
    duplicates = 0
    first_duplicate: tuple[int, int] | None = None
    for pair, key in zip(pairs, keys):
        if key in seen:
            duplicates += 1
            first_duplicate = first_duplicate or (pair.row, seen[key])
        else:
            seen[key] = pair.row
    warnings: list[str] = []
    if duplicates:
        message = f"{duplicates} duplicate (prompt, chosen, rejected) rows, first at row {first_duplicate[0]} " \
                  f"(same as row {first_duplicate[1]})"
        if duplicates / len(pairs) > duplicate_threshold:
            raise DatasetError(path, message + f": {duplicates / len(pairs):.0%} of rows, above the "
                               f"{duplicate_threshold:.0%} limit", row=first_duplicate[0], column="prompt",
                               hint="deduplicate the file, e.g. df.drop_duplicates()")
        warnings.append(message)

    per_prompt = Counter(normalised_text(p.prompt) for p in pairs)
    report = ValidationReport(
        path=str(path),
        rows=len(pairs),
        unique_prompts=len(per_prompt),
        pairs_per_prompt=_stats(list(per_prompt.values())),
        length_chars={
            column: _stats([sum(len(m["content"]) for m in getattr(p, column)) for p in pairs])
            for column in REQUIRED_COLUMNS
        },
        duplicates=duplicates,
        columns=list(table.columns),
        warnings=warnings,
    )
    if tokenize_pair is not None:
        _check_tokens(path, pairs, report, tokenize_pair, max_length)
    return pairs, report


def _check_tokens(path: Path, pairs: list[PreferencePair], report: ValidationReport,
                  tokenize_pair: TokenizePair, max_length: int | None) -> None:
    chosen_lengths, rejected_lengths, prompt_lengths = [], [], []
    truncated = 0
    for pair in pairs:
        chosen, rejected, prompt_len = tokenize_pair(pair)
        chosen_lengths.append(len(chosen))
        rejected_lengths.append(len(rejected))
        prompt_lengths.append(prompt_len)
        if max_length is None:
            continue
        if len(chosen) > max_length or len(rejected) > max_length:
            truncated += 1
            if list(chosen[:max_length]) == list(rejected[:max_length]):
                raise DatasetError(
                    path, f"chosen and rejected become identical after truncation to max_length={max_length} "
                    f"(prompt is {prompt_len} tokens)", row=pair.row, column="chosen",
                    hint="raise max_length, shorten the prompt, or drop the row")
    report.length_tokens = {
        "prompt": _stats(prompt_lengths), "prompt+chosen": _stats(chosen_lengths),
        "prompt+rejected": _stats(rejected_lengths),
    }
    if max_length is not None:
        report.max_length, report.truncated_rows = max_length, truncated
        if truncated:
            report.warnings.append(
                f"{truncated} of {len(pairs)} rows ({truncated / len(pairs):.0%}) exceed max_length={max_length} "
                "and will be truncated")
