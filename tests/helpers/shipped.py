"""The data the flow, e2e and reliability tests train on: a fixed slice of the shipped data.

The shipped datasets have 140 pairs each (160 prompts; issue 15's held-out split needs them). The tests exercise
the flows' mechanics (caching, resume, concurrency, signals), not the study's signal, so they train on the pairs
of the first `TEST_PAIRS` prompts of dataset 1, in every dataset and the control alike (all four have one pair per
prompt, on the same prompts), with the shipped prompt files unchanged: the same real texts, in about half the
steps. Tests about the shipped files themselves (their validity, the default suite's step count) read
`ROOT / "data"` directly, and so do tests that cut their own few pairs from it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "data"
TEST_PAIRS = 80
PROMPT_FILES = ("train_prompts.parquet", "eval_prompts.parquet")


def shipped_slice(folder: Path, pairs: int = TEST_PAIRS) -> Path:
    """Write every shipped dataset (1-3, controls) cut to the prompts of dataset 1's first `pairs` rows, and the
    prompt files, into `folder`."""
    import pandas as pd

    from dpo_core import data

    folder.mkdir(parents=True, exist_ok=True)
    frames = {name: pd.read_parquet(SHIPPED / name)
              for name in (*data.DATASET_FILES.values(), *data.CONTROL_DATASET_FILES)}
    first = frames[data.DATASET_FILES[1]]
    assert len(first) >= pairs, f"dataset 1 has {len(first)} pairs, fewer than the {pairs} asked for"
    prompts = set(first["prompt_id"].head(pairs))  # the same prompts in every file (the control is sorted apart)
    for name, frame in frames.items():
        frame[frame["prompt_id"].isin(prompts)].reset_index(drop=True).to_parquet(folder / name)
    for name in PROMPT_FILES:
        shutil.copy(SHIPPED / name, folder / name)
    return folder
