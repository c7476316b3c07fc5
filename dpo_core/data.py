"""Preference datasets: the registry (1, 2, 3), loaders (parquet, jsonl, HF datasets folder), strict validation.

A row is `prompt`, `chosen`, `rejected`: strings, or chat message lists `[{"role", "content"}]`.
Optional provenance columns (`prompt_id`, `creativity_score`, scores) pass through.
Every hard failure raises one `DatasetError` naming the file, the row (0-based, as in pandas) and
the column, with a hint to fix it. Validation with its report of soft problems: `dpo_core.dataset_checks`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DATASET_FILES: dict[int, str] = {
    1: "dataset1_embedding_diversity.parquet",
    2: "dataset2_quality_based.parquet",
    3: "dataset3_llm_judge_diversity.parquet",
}
DATASET_CRITERIA: dict[int, str] = {1: "embedding diversity", 2: "quality", 3: "LLM-judge diversity"}
# The positive control (issue 15): pairs built to change diversity strongly, so the study can show its instrument
# sees an effect when there is one (chosen = the most diverse candidate of a prompt's pool, rejected = the least).
# It has no quality filter, so it also rewards degeneration: the report calls it the degeneration control.
CONTROL_DATASET_FILE = "control_diversity.parquet"
# The quality-preserving control (DivPO, Lanchantin et al. 2025): chosen = the most diverse candidate above the
# prompt's quality threshold, rejected = the least diverse below it.
CONTROL_QUALITY_FILE = "control_quality.parquet"
CONTROL_DATASET_FILES = (CONTROL_DATASET_FILE, CONTROL_QUALITY_FILE)
PROMPT_BASELINE = "prompt"  # the prompting baseline's `dataset` in the report: the base model, instructed
CONTROL_NAMES = {CONTROL_DATASET_FILE: "degeneration control: chosen = most diverse candidate, rejected = least, "
                                       "no quality filter",
                 CONTROL_QUALITY_FILE: "quality-preserving control (DivPO): chosen = most diverse candidate above "
                                       "the prompt's median fluency, rejected = least diverse below it"}
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
PROMPT_ROLES = {"system", "user", "assistant"}
RESPONSE_ROLES = {"assistant"}
DEFAULT_DUPLICATE_THRESHOLD = 0.1  # fraction of exact duplicate rows above which the file is refused

Message = dict[str, str]


class DatasetError(ValueError):
    """A dataset that cannot be used. The message names file, row and column, and the fix."""

    def __init__(
        self, path: Path | str, problem: str, *, row: int | None = None, column: str | None = None,
        hint: str = "",
    ):
        self.path, self.row, self.column, self.problem, self.hint = str(path), row, column, problem, hint
        where = [self.path]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        message = f"{', '.join(where)}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __reduce__(self):
        # Rebuilt from its parts, not its message: it crosses process boundaries (a Dask worker validates).
        return _rebuild_dataset_error, (type(self), self.path, self.problem, self.row, self.column, self.hint)


class DatasetNotFoundError(FileNotFoundError):
    """The seed's error for a dataset that does not exist yet."""

    def __init__(self, path: Path | str):
        self.path = str(path)
        super().__init__(
            f"Dataset file not found: {path} (generate it with `python flows/pairs.py`, "
            "or pass dataset=PATH to an existing parquet/jsonl file or HF datasets folder)"
        )

    def __reduce__(self):
        return type(self), (self.path,)


def _rebuild_dataset_error(cls: type[DatasetError], path: str, problem: str, row: int | None, column: str | None,
                           hint: str) -> DatasetError:
    return cls(path, problem, row=row, column=column, hint=hint)


@dataclass(frozen=True)
class PreferencePair:
    """One explicit chosen/rejected pair, normalised to chat messages."""

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    row: int
    prompt_id: str | None = None
    creativity_score: float | None = None

    def chosen_conversation(self) -> list[Message]:
        return [*self.prompt, *self.chosen]

    def rejected_conversation(self) -> list[Message]:
        return [*self.prompt, *self.rejected]

    def prompt_text(self) -> str:
        return "\n".join(m["content"] for m in self.prompt)


# ----------------------------------------------------------------------------------------------
# Locating and reading
# ----------------------------------------------------------------------------------------------


def resolve_dataset(dataset: int | str | Path, data_dir: Path, cache_dir: Path | None = None) -> Path:
    """Dataset number (1, 2, 3) -> file in `data_dir`; a path is taken as is. Missing -> the seed's error.
    A public set's name (`hh-rlhf`, `hf:NAME`, dpo_core.public_datasets) -> its converted file under
    `<cache_dir>/datasets/` (default: `<data_dir>/.converted/`)."""
    from dpo_core import public_datasets

    if public_datasets.is_public_spec(dataset):
        folder = Path(cache_dir) / "datasets" if cache_dir is not None else Path(data_dir) / ".converted"
        return public_datasets.materialize(str(dataset), folder)
    if isinstance(dataset, int) or (isinstance(dataset, str) and dataset.strip().isdigit()):
        number = int(dataset)
        if number not in DATASET_FILES:
            raise ValueError(f"dataset must be 1, 2, 3 or a path to a dataset file, got {number}")
        path = Path(data_dir) / DATASET_FILES[number]
    else:
        path = Path(dataset)
        if not path.exists() and not path.is_absolute() and (Path(data_dir) / path).exists():
            path = Path(data_dir) / path  # a bare file name in the data folder, e.g. the positive control's
    if not path.exists():
        raise DatasetNotFoundError(path)
    return path


def _by_prompt(pairs: Sequence[PreferencePair], seed: int) -> list[list[int]]:
    """Positions grouped by prompt, the groups in a seeded order that does not depend on row order."""
    groups: dict[str, list[int]] = {}
    for position, pair in enumerate(pairs):
        groups.setdefault(" ".join(pair.prompt_text().split()).lower(), []).append(position)
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    return [groups[prompt] for prompt in order]


def pair_subset(pairs: Sequence[PreferencePair], max_pairs: int | None, seed: int) -> list[PreferencePair]:
    """A seeded subset of at most `max_pairs` pairs, whole prompts only, in the dataset's order (None: all).

    Its own seed stream (seed + 1), so that the subset and the held-out split drawn from it are not the same
    shuffle."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return list(pairs)
    kept: list[int] = []
    for group in _by_prompt(pairs, seed + 1):
        if len(kept) + len(group) <= max_pairs:
            kept.extend(group)
    return [pairs[i] for i in sorted(kept)]


def held_out_split(pairs: Sequence[PreferencePair], fraction: float, min_pairs: int, seed: int
                   ) -> tuple[list[int], list[int]]:
    """(train, held-out) positions of a fixed, seeded held-out split; pairs sharing a prompt stay together.

    The held-out part is `max(ceil(fraction * n), min_pairs)` pairs (whole prompts, so it may be a few more),
    and none at all when `fraction` is 0 or the dataset has fewer than `2 * min_pairs` pairs: a split that
    would leave training with less than half the data is not worth its noise. Positions are returned sorted.
    """
    from dpo_core.config import held_out_size  # the one size rule, shared with the step-count check

    target = held_out_size(len(pairs), fraction, min_pairs)
    if target == 0:
        return list(range(len(pairs))), []
    held: list[int] = []
    for group in _by_prompt(pairs, seed):
        if len(held) >= target:
            break
        held.extend(group)
    if len(held) >= len(pairs):
        return list(range(len(pairs))), []
    held_set = set(held)
    return [i for i in range(len(pairs)) if i not in held_set], sorted(held)


def content_hash(path: Path) -> str:
    """sha256 of the dataset's bytes (all files, in name order, for a folder)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_table(path: Path) -> pd.DataFrame:
    """Read parquet, jsonl/json-lines or a saved HF `datasets` folder into a DataFrame."""
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(path)
    if path.is_dir():
        return _read_hf_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DatasetError(path, f"could not be read as parquet ({type(exc).__name__}: {exc})",
                               hint="re-export the file, e.g. df.to_parquet(path)") from None
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    raise DatasetError(path, f"unsupported file type '{suffix}'",
                       hint="use .parquet, .jsonl, or a folder saved with datasets.save_to_disk")


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(path, f"is not valid UTF-8 text at byte {exc.start} of the line",
                                   row=len(records), hint="re-encode the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DatasetError(path, f"line {line_no + 1} is not valid JSON ({exc.msg})",
                                   row=len(records), hint="one JSON object per line") from None
            if not isinstance(record, dict):
                raise DatasetError(path, f"line {line_no + 1} is a {type(record).__name__}, not an object",
                                   row=len(records), hint="one JSON object per line")
            records.append(record)
    return pd.DataFrame.from_records(records)


def _read_hf_folder(path: Path) -> pd.DataFrame:
    try:
        import datasets

        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DatasetError(path, f"could not be read as a HF datasets folder ({type(exc).__name__}: {exc})",
                           hint="save it with Dataset.save_to_disk(path)") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DatasetError(path, f"DatasetDict has no 'train' split (splits: {list(loaded)})",
                               hint="save the training split alone or name it 'train'")
        loaded = loaded["train"]
    return loaded.to_pandas()


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


def _as_messages(path: Path, value: Any, row: int, column: str, roles: set[str]) -> tuple[Message, ...]:
    """A cell -> chat messages; strings become one message of the column's natural role."""
    if _is_missing(value):
        raise DatasetError(path, "is null", row=row, column=column, hint="every pair needs all three texts")
    if isinstance(value, str):
        if not value.strip():
            raise DatasetError(path, "is empty", row=row, column=column, hint="drop the row or fill the text")
        return ({"role": "user" if column == "prompt" else "assistant", "content": value},)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise DatasetError(path, f"has type {type(value).__name__}; expected a string or a list of "
                           "{role, content} messages", row=row, column=column)
    if not value:
        raise DatasetError(path, "is an empty message list", row=row, column=column,
                           hint="drop the row or fill the text")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DatasetError(path, f"message {index} is not a {{role, content}} object", row=row,
                               column=column)
        role, content = message["role"], message["content"]
        if role not in roles:
            raise DatasetError(path, f"message {index} has role {role!r}; allowed here: {sorted(roles)}",
                               row=row, column=column)
        if not isinstance(content, str) or not content.strip():
            raise DatasetError(path, f"message {index} has empty or non-text content", row=row, column=column)
        messages.append({"role": role, "content": content})
    if column == "prompt" and messages[-1]["role"] != "user":
        raise DatasetError(path, "the last prompt message must have role 'user'", row=row, column=column)
    return tuple(messages)


def normalised_text(messages: tuple[Message, ...]) -> str:
    return "\n".join(f"{m['role']}:{' '.join(m['content'].split())}" for m in messages)


def load_pairs(path: Path, table: pd.DataFrame | None = None) -> list[PreferencePair]:
    """Read and strictly check every row; returns the explicit pairs or raises one DatasetError."""
    path = Path(path)
    table = read_table(path) if table is None else table
    if len(table) == 0:
        raise DatasetError(path, "has zero rows", hint="a dataset needs at least one preference pair")
    for column in REQUIRED_COLUMNS:
        if column not in table.columns:
            raise DatasetError(path, f"is missing (columns present: {list(table.columns)})", column=column,
                               hint="rename your columns to prompt/chosen/rejected")
    has_id, has_creativity = "prompt_id" in table.columns, "creativity_score" in table.columns
    pairs = []
    for row, record in enumerate(table.to_dict("records")):
        prompt = _as_messages(path, record["prompt"], row, "prompt", PROMPT_ROLES)
        chosen = _as_messages(path, record["chosen"], row, "chosen", RESPONSE_ROLES)
        rejected = _as_messages(path, record["rejected"], row, "rejected", RESPONSE_ROLES)
        if normalised_text(chosen) == normalised_text(rejected):
            raise DatasetError(path, "chosen is identical to rejected (after whitespace normalisation)",
                               row=row, column="rejected", hint="drop the row: it carries no preference")
        creativity = None
        if has_creativity and not _is_missing(record["creativity_score"]):
            creativity = record["creativity_score"]
            if isinstance(creativity, bool) or not isinstance(creativity, (int, float, np.number)) \
                    or not 0.0 <= float(creativity) <= 1.0:
                raise DatasetError(path, f"must be a number in [0, 1], got {creativity!r}", row=row,
                                   column="creativity_score")
            creativity = float(creativity)
        prompt_id = record["prompt_id"] if has_id and not _is_missing(record["prompt_id"]) else None
        pairs.append(PreferencePair(prompt, chosen, rejected, row,
                                    None if prompt_id is None else str(prompt_id), creativity))
    return pairs


TokenizePair = Callable[[PreferencePair], tuple[Sequence[int], Sequence[int], int]]
"""pair -> (chosen tokens, rejected tokens, prompt tokens count), rendered as the trainer will."""


# ----------------------------------------------------------------------------------------------
# Eval prompts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPrompt:
    prompt_id: str
    prompt: str
    creativity_score: float


def load_eval_prompts(path: Path) -> list[EvalPrompt]:
    """Eval prompts: `prompt_id`, `prompt`, `creativity_score` in [0, 1]; strict like the datasets."""
    path = Path(path)
    table = read_table(path)
    if len(table) == 0:
        raise DatasetError(path, "has zero rows", hint="an eval set needs prompts")
    for column in ("prompt_id", "prompt", "creativity_score"):
        if column not in table.columns:
            raise DatasetError(path, f"is missing (columns present: {list(table.columns)})", column=column)
    prompts, seen_ids = [], set()
    for row, record in enumerate(table.to_dict("records")):
        text, prompt_id, score = record["prompt"], record["prompt_id"], record["creativity_score"]
        if _is_missing(text) or not isinstance(text, str) or not text.strip():
            raise DatasetError(path, "must be a non-empty string", row=row, column="prompt")
        if _is_missing(prompt_id) or str(prompt_id) in seen_ids:
            raise DatasetError(path, "must be present and unique", row=row, column="prompt_id")
        if _is_missing(score) or not isinstance(score, (int, float, np.number)) or not 0 <= float(score) <= 1:
            raise DatasetError(path, f"must be a number in [0, 1], got {score!r}", row=row, column="creativity_score")
        seen_ids.add(str(prompt_id))
        prompts.append(EvalPrompt(str(prompt_id), text, float(score)))
    return prompts
