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


def test_a_local_name_mapped_to_other_weights_is_another_cache_key(tmp_path):
    """DPO_LOCAL_MODELS can serve other weights under one name: the local backend's part of every model task's
    key carries each served model's weights fingerprint, so a cached result never answers for other weights."""
    from dpo_core.settings import Settings
    from tasks.caching import compute_identity

    first, second = tmp_path / "a", tmp_path / "b"
    for folder, content in ((first, b"one"), (second, b"two")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(content)

    def identity(folder):
        return compute_identity(Settings(backend="local", local_device="cpu", cache_dir=tmp_path / "cache",
                                         local_models={"test/model": folder}))

    assert identity(first) == identity(first)
    assert identity(first) != identity(second)
    (second / "model.safetensors").write_bytes(b"one")  # same bytes, same weights, wherever they live
    fingerprints = {name: weights for name, weights in identity(second)[-1]}
    assert fingerprints["test/model"] == {name: w for name, w in identity(first)[-1]}["test/model"]
    (second / "model.safetensors").write_bytes(b"three")  # changed in place: the memo notices
    assert {name: w for name, w in identity(second)[-1]}["test/model"] != fingerprints["test/model"]
