"""Length control for the text diversity metrics (pure functions).

DPO on summed logprobs shifts output length, and length alone moves distinct-n (more words, more repeats),
self-BLEU and gzip compression. To tell a diversity change from a length change, each prompt's samples from the
compared models are cut to one common word length (the shortest sample among all of them for that prompt) and
the text metrics are recomputed on the cut samples. A change that survives the cut is not a length effect.
The metric functions are `dpo_core.diversity`'s own, so a length-controlled score means exactly what the raw
one means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from dpo_core.diversity import compression_ratio, distinct_n, self_bleu

LENGTH_CONTROLLED_PREFIX = "lc_"
TEXT_METRICS: dict[str, Callable[[Sequence[str]], float]] = {
    "distinct_1": lambda samples: distinct_n(samples, 1),
    "distinct_2": lambda samples: distinct_n(samples, 2),
    "self_bleu": self_bleu,
    "compression_ratio": compression_ratio,
}
SampleRows = pd.DataFrame | Sequence[Mapping]


def length_controlled_name(metric: str) -> str:
    """Column name of a text metric recomputed at equal length, e.g. `lc_distinct_2`."""
    return LENGTH_CONTROLLED_PREFIX + metric


def raw_metric_name(metric: str) -> str:
    """The raw metric behind a length-controlled name (other names are returned unchanged)."""
    return metric[len(LENGTH_CONTROLLED_PREFIX):] if metric.startswith(LENGTH_CONTROLLED_PREFIX) else metric


def truncate_words(text: str, num_words: int) -> str:
    """The first `num_words` whitespace-separated words of `text`, joined by single spaces."""
    return " ".join(text.split()[:num_words])


def _as_frame(samples: SampleRows) -> pd.DataFrame:
    frame = samples if isinstance(samples, pd.DataFrame) else pd.DataFrame(list(samples))
    missing = {"prompt_id", "text"} - set(frame.columns)
    if missing:
        raise ValueError("sample rows need columns prompt_id and text (as in samples.jsonl); "
                         f"missing {sorted(missing)}")
    # Compression depends on the order samples are joined in: fix it so every run scores the same text.
    return frame.sort_values(["prompt_id", "sample_index"] if "sample_index" in frame.columns else ["prompt_id"],
                             kind="stable")


def common_word_lengths(samples: Mapping[str, SampleRows], labels: Sequence[str]) -> pd.Series:
    """Per prompt (index prompt_id): the shortest sample's word count among all the labelled models' samples."""
    frames = [_as_frame(samples[label]) for label in labels]
    shared = set.intersection(*(set(frame["prompt_id"]) for frame in frames)) if frames else set()
    per_model = [frame[frame["prompt_id"].isin(shared)]
                 .assign(num_words=lambda f: f["text"].map(lambda text: len(str(text).split())))
                 .groupby("prompt_id")["num_words"].min() for frame in frames]
    return pd.concat(per_model, axis=1).min(axis=1).astype(int).rename("common_words").sort_index()


def length_controlled_scores(samples: Mapping[str, SampleRows], labels: Sequence[str],
                             metrics: Sequence[str] = tuple(TEXT_METRICS)) -> dict[str, pd.DataFrame]:
    """Per label: one row per shared prompt with `common_words` and each text metric on samples cut to it.

    A prompt where some compared sample is empty has common length 0: its length-controlled metrics are NaN
    (there is no text left to compare), and paired tests then leave that prompt out.
    """
    unknown = [m for m in metrics if m not in TEXT_METRICS]
    if unknown:
        raise ValueError(f"no length-controlled version of {unknown}; text metrics are {list(TEXT_METRICS)}")
    lengths = common_word_lengths(samples, labels)
    result = {}
    for label in labels:
        texts_by_prompt = _as_frame(samples[label]).groupby("prompt_id", sort=False)["text"].apply(list)
        rows = []
        for prompt_id, common in lengths.items():
            row: dict = {"prompt_id": prompt_id, "common_words": int(common)}
            cut = [truncate_words(str(text), common) for text in texts_by_prompt[prompt_id]]
            for metric in metrics:
                row[length_controlled_name(metric)] = TEXT_METRICS[metric](cut) if common > 0 else float("nan")
            rows.append(row)
        result[label] = pd.DataFrame(rows)
    return result


def mean_lengths(scores: Mapping[str, pd.DataFrame],
                 length_columns: Sequence[str] = ("mean_words", "mean_tokens")) -> pd.DataFrame:
    """One row per model label: prompts scored and the mean over prompts of each length column present."""
    rows = []
    for label, frame in scores.items():
        row: dict = {"label": label, "num_prompts": int(len(frame))}
        for column in length_columns:
            row[column] = float(np.nanmean(frame[column])) if column in frame.columns and len(frame) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)
