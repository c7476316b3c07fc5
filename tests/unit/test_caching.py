"""Cache keys cover every line of project code: an edit to a module no task names still recomputes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The train task's cache key for a fixed input, computed by a fresh process over the project copy at `root`.
KEY_OF_TRAIN_TASK = """
from dpo_core.config import TrainConfig
from dpo_core.experiment import ValidatedDataset
from tasks.train import train_experiment
dataset = ValidatedDataset(path="pairs.parquet", sha256="0" * 64, rows=8, report_markdown="")
print(train_experiment.cache_key_fn(None, {"config": TrainConfig(model_name="local/tiny", dataset=1),
                                           "dataset": dataset}))
"""


def _train_key(root: Path) -> str:
    done = subprocess.run([sys.executable, "-c", KEY_OF_TRAIN_TASK], cwd=root, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HOME": str(root),
                               "DPO_BACKEND": "local", "DPO_LOCAL_DEVICE": "cpu"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_editing_rendering_changes_the_train_key(tmp_path):
    for folder in ("dpo_core", "tasks"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    before = _train_key(tmp_path)
    assert _train_key(tmp_path) == before  # the key is stable while nothing changes
    rendering = tmp_path / "dpo_core" / "rendering.py"
    rendering.write_text(rendering.read_text() + "\n# an edit no task names: the next run must recompute\n")
    assert _train_key(tmp_path) != before


def test_code_fingerprint_covers_every_module(tmp_path):
    from tasks.caching import code_fingerprint

    for folder in ("dpo_core", "tasks"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_fingerprint(tmp_path)
    engine = tmp_path / "dpo_core" / "local" / "engine.py"
    engine.write_text(engine.read_text() + "\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint(tmp_path) != before
