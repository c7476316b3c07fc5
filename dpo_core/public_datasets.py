"""Public preference datasets by name, converted to explicit prompt / chosen / rejected messages.

    dataset=hh-rlhf | helpsteer3 | ultrafeedback     the set from the local HF datasets cache (never downloaded here)
    dataset=hh-rlhf:train                            ... one split of it
    dataset=hh-rlhf:/path/file.jsonl                 a local parquet/jsonl file in the set's own schema
    dataset=hf:NAME[:SPLIT]                          any cached HF set already in TRL's standard or conversational
                                                     format (prompt/chosen/rejected, or chosen/rejected sharing a
                                                     prompt prefix)

The converted pairs are written once to `<cache_dir>/datasets/` as parquet (keyed by the source's fingerprint) and
then go through the same strict validation as any dataset file; rows a converter cannot use (ties, malformed
transcripts) are dropped and counted in a `.json` beside it, which the validation report shows.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dpo_core.data import DatasetError, DatasetNotFoundError, Message, content_hash, read_table

CONVERTER_VERSION = 1  # part of each converted file's name: a converter change converts again
Row = dict[str, Any]
Converted = tuple[list[Message], list[Message], list[Message]]


class DatasetNotCachedError(DatasetNotFoundError):
    """A public set that is not in the local HF datasets cache; the message says how to get it."""

    def __init__(self, spec: str, repo: str, config: str | None, split: str, detail: str = ""):
        self.spec, self.repo, self.config, self.split, self.detail = spec, repo, config, split, detail
        name_args = f"{repo!r}" + (f", {config!r}" if config else "")
        FileNotFoundError.__init__(
            self, f"dataset {spec}: {repo} (split {split}) is not in the local HF datasets cache{detail}; nothing is "
            "downloaded at run time. Fetch it once where huggingface.co is reachable, with the same HF_HOME: "
            f".venv/bin/python -c \"import datasets; datasets.load_dataset({name_args}, split={split!r})\"; or "
            + ("pass dataset=PATH to a local parquet/jsonl file or saved HF datasets folder" if spec.startswith("hf:")
               else f"pass dataset={spec.split(':')[0]}:PATH to a local parquet/jsonl file in its own schema"))
        self.path = spec

    def __reduce__(self):
        return type(self), (self.spec, self.repo, self.config, self.split, self.detail)


# ----------------------------------------------------------------------------------------------
# Converters: one source row -> (prompt, chosen, rejected) messages, or a reason to drop it
# ----------------------------------------------------------------------------------------------


class Drop(Exception):
    """A row the converter cannot use; its message is the reason counted in the conversion's summary."""


_HH_TURN = re.compile(r"\n\nHuman: |\n\nAssistant: ")


def _hh_messages(transcript: str) -> list[Message]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` -> messages; the markers start each turn (text inside a turn that
    merely mentions "Human:" is kept)."""
    text = "\n\n" + transcript.lstrip("\n") if not transcript.startswith("\n\n") else transcript
    markers = list(_HH_TURN.finditer(text))
    if not markers or markers[0].start() != 0:
        raise Drop("malformed transcript")
    messages = []
    for marker, following in zip(markers, [*markers[1:], None]):
        content = text[marker.end():following.start() if following else None].strip()
        messages.append({"role": "user" if "Human" in marker.group() else "assistant", "content": content})
    return messages


def convert_hh_rlhf(row: Row) -> Converted:
    """Anthropic HH-RLHF: two full transcripts (`chosen`, `rejected`) that share every turn but the last assistant
    one; split at the last assistant turn into the shared prompt and the two answers."""
    chosen, rejected = _hh_messages(str(row["chosen"])), _hh_messages(str(row["rejected"]))
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise Drop("malformed transcript")
    if chosen[:-1] != rejected[:-1] or not chosen[:-1] or chosen[-2]["role"] != "user":
        raise Drop("transcripts differ before the last assistant turn")
    return chosen[:-1], [chosen[-1]], [rejected[-1]]


def convert_helpsteer3(row: Row) -> Converted:
    """NVIDIA HelpSteer3 (preference): `context` messages, `response1`, `response2` and `overall_preference` in
    -3..3 (negative: response1 is better); 0 is a tie and carries no preference."""
    preference = int(row["overall_preference"])
    if preference == 0:
        raise Drop("tie (overall_preference 0)")
    context = [{"role": str(m["role"]), "content": str(m["content"])} for m in _as_list(row["context"])]
    better, worse = (row["response1"], row["response2"]) if preference < 0 else (row["response2"], row["response1"])
    return context, [{"role": "assistant", "content": str(better)}], [{"role": "assistant", "content": str(worse)}]


def convert_ultrafeedback(row: Row) -> Converted:
    """UltraFeedback binarized, in either published schema: argilla's (`instruction`, `chosen_response`,
    `rejected_response`, the cookbook's choice) or HuggingFaceH4's (`prompt` and message lists `chosen`/`rejected`
    with `score_chosen`/`score_rejected`; equal scores are a tie)."""
    if "instruction" in row:
        return ([{"role": "user", "content": str(row["instruction"])}],
                [{"role": "assistant", "content": str(row["chosen_response"])}],
                [{"role": "assistant", "content": str(row["rejected_response"])}])
    if "score_chosen" in row and row["score_chosen"] == row["score_rejected"]:
        raise Drop("tie (score_chosen = score_rejected)")
    return convert_standard(row)


def convert_standard(row: Row) -> Converted:
    """TRL's formats: explicit `prompt` with `chosen`/`rejected` (strings or messages), or implicit prompt (message
    lists `chosen`/`rejected` that share every message but the last)."""
    chosen, rejected = _messages(row["chosen"], "assistant"), _messages(row["rejected"], "assistant")
    if row.get("prompt") is not None:
        prompt = _messages(row["prompt"], "user")
        # H4-style rows repeat the prompt at the head of chosen/rejected: keep only the answers.
        if chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        return prompt, chosen, rejected
    if "chosen" in row and chosen[:-1] == rejected[:-1] and len(chosen) > 1:
        return chosen[:-1], chosen[-1:], rejected[-1:]
    raise Drop("no prompt column and no shared prompt prefix in chosen/rejected")


def _as_list(value: Any) -> list:
    return list(value.tolist() if hasattr(value, "tolist") else value)


def _messages(value: Any, role: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in _as_list(value)]


@dataclass(frozen=True)
class PublicSet:
    repo: str
    config: str | None
    split: str
    convert: Callable[[Row], Converted]


# The cookbook's choices (tinker_cookbook/recipes/preference/datasets.py), train splits.
PUBLIC_SETS: dict[str, PublicSet] = {
    "hh-rlhf": PublicSet("Anthropic/hh-rlhf", None, "train", convert_hh_rlhf),
    "helpsteer3": PublicSet("nvidia/HelpSteer3", "preference", "train", convert_helpsteer3),
    "ultrafeedback": PublicSet("argilla/ultrafeedback-binarized-preferences", None, "train", convert_ultrafeedback),
}
_FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".ndjson")


def is_public_spec(dataset: Any) -> bool:
    """Whether `dataset` names a public set (`hh-rlhf`, `helpsteer3:PATH`, `hf:NAME`) rather than a file."""
    if not isinstance(dataset, str) or Path(dataset).exists():
        return False
    name = dataset.split(":", 1)[0]
    return name in PUBLIC_SETS or (name == "hf" and ":" in dataset)


def convert_rows(rows: list[Row], convert: Callable[[Row], Converted]) -> tuple[pd.DataFrame, Counter]:
    """Every source row through the converter; rows it drops, or whose answers are empty or identical, are counted
    by reason. `source_row` keeps each pair's row in the source."""
    kept, dropped = [], Counter()
    for index, row in enumerate(rows):
        try:
            prompt, chosen, rejected = convert(row)
        except Drop as reason:
            dropped[str(reason)] += 1
            continue
        except (KeyError, TypeError, ValueError) as exc:
            dropped[f"malformed row ({type(exc).__name__}: {exc})"[:120]] += 1
            continue
        texts = [m["content"].strip() for m in (*prompt, *chosen, *rejected)]
        if not all(texts):
            dropped["empty text"] += 1
        elif [m["content"].split() for m in chosen] == [m["content"].split() for m in rejected]:
            dropped["chosen identical to rejected"] += 1
        else:
            kept.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "source_row": index})
    return pd.DataFrame(kept, columns=["prompt", "chosen", "rejected", "source_row"]), dropped


def materialize(spec: str, out_dir: Path, hf_cache_dir: str | None = None) -> Path:
    """Convert the set `spec` names into `<out_dir>/<name>-<fingerprint>.parquet` (once) and return that path."""
    name, _, rest = spec.partition(":")
    if name == "hf":
        repo, _, split = rest.partition(":")
        source = PublicSet(repo, None, split or "train", convert_standard)
    else:
        source = PUBLIC_SETS[name]
        if rest and (rest.lower().endswith(_FILE_SUFFIXES) or "/" in rest or Path(rest).exists()):
            return _write_converted(spec, Path(rest), out_dir, source.convert, None)
        if rest:
            source = PublicSet(source.repo, source.config, rest, source.convert)
    return _write_converted(spec, None, out_dir, source.convert, (source, hf_cache_dir))


def _write_converted(spec: str, file: Path | None, out_dir: Path, convert: Callable[[Row], Converted],
                     hub: tuple[PublicSet, str | None] | None) -> Path:
    if file is not None:
        if not file.exists():
            raise DatasetNotFoundError(file)
        fingerprint, load = content_hash(file), (lambda: read_table(file))
    else:
        loaded = _load_cached(spec, *hub)
        fingerprint, load = loaded._fingerprint, loaded.to_pandas
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.split(":", 1)[0] if file else spec)
    target = Path(out_dir) / f"{slug}-v{CONVERTER_VERSION}-{fingerprint[:16]}.parquet"
    if target.exists():
        return target
    table, dropped = convert_rows(load().to_dict("records"), convert)
    if table.empty:
        raise DatasetError(str(file or spec), f"no usable preference pair after conversion (dropped: {dict(dropped)})",
                           hint="check that the file is in the set's own schema (docs/datasets.md)")
    target.parent.mkdir(parents=True, exist_ok=True)
    from dpo_core.fsutil import atomic_write_bytes

    summary = {"source": str(file) if file else f"{hub[0].repo} ({hub[0].config or 'default'}, {hub[0].split})",
               "spec": spec, "source_rows": len(table) + sum(dropped.values()), "pairs": len(table),
               "dropped": dict(dropped)}
    atomic_write_bytes(summary_path(target), json.dumps(summary, indent=2).encode())
    atomic_write_bytes(target, table.to_parquet(index=False))  # last: its presence means both are complete
    return target


def summary_path(converted: Path) -> Path:
    return converted.with_suffix(".json")


def conversion_note(path: Path) -> str | None:
    """One line on how a converted file came to be (source, rows kept, rows dropped by reason); None otherwise."""
    summary = summary_path(Path(path))
    if Path(path).suffix != ".parquet" or not summary.exists():
        return None
    try:
        info = json.loads(summary.read_text())
        dropped = ", ".join(f"{count} {reason}" for reason, count in info["dropped"].items()) or "none"
        return (f"Converted from {info['source']}: {info['pairs']} pairs from {info['source_rows']} source rows; "
                f"dropped: {dropped}.")
    except (OSError, ValueError, KeyError):
        return None


def _load_cached(spec: str, source: PublicSet, cache_dir: str | None) -> Any:
    """The split from the local HF datasets cache only: offline for this call, whatever the environment says."""
    import datasets
    from datasets import config as datasets_config

    before = datasets_config.HF_HUB_OFFLINE
    datasets_config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(source.repo, source.config, split=source.split, cache_dir=cache_dir)
    except Exception as exc:  # offline misses raise ConnectionError, FileNotFoundError or ValueError by version
        raise DatasetNotCachedError(spec, source.repo, source.config, source.split,
                                    f" ({type(exc).__name__}: {str(exc)[:160]})") from None
    finally:
        datasets_config.HF_HUB_OFFLINE = before
