"""The data the flow, e2e and reliability tests train on: a fixed slice of the shipped data.

The shipped datasets have 140 pairs each (160 prompts; issue 15's held-out split needs them). The tests exercise
the flows' mechanics (caching, resume, concurrency, signals), not the study's signal, so they train on the first
`TEST_PAIRS` rows of each shipped dataset and the control, with the shipped prompt files unchanged: the same real
texts, in about half the steps. Tests about the shipped files themselves (their validity, the default suite's step
count) read `ROOT / "data"` directly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "data"
TEST_PAIRS = 80
PROMPT_FILES = ("train_prompts.parquet", "eval_prompts.parquet")


def shipped_slice(folder: Path, pairs: int = TEST_PAIRS) -> Path:
    """Write the first `pairs` rows of every shipped dataset (1-3, control) and the prompt files into `folder`."""
    import pandas as pd

    from dpo_core import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in (*data.DATASET_FILES.values(), data.CONTROL_DATASET_FILE):
        pd.read_parquet(SHIPPED / name).head(pairs).to_parquet(folder / name)
    for name in PROMPT_FILES:
        shutil.copy(SHIPPED / name, folder / name)
    return folder
