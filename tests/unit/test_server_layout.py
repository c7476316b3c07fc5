"""The server is a separate building: layout rules of issue 12, checked on the source itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_core.local import ids
from dpo_core.local.checkpoints import CheckpointStore
from dpo_core.local.validation import UserError

PACKAGE = Path(__file__).resolve().parents[2] / "dpo_core"


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_only_backend_reaches_into_the_server_package():
    offenders = [path.name for path in sorted(PACKAGE.glob("*.py")) if path.name != "backend.py"
                 and any(m == "dpo_core.local" or m.startswith("dpo_core.local.") for m in _imported_modules(path))]
    assert offenders == []


def test_importing_the_client_library_loads_no_server_module():
    client = ["rendering", "diversity", "evaluate", "pairs", "train", "sampling", "data", "experiment", "backend",
              "models"]
    code = ("import sys\n" + "".join(f"import dpo_core.{name}\n" for name in client)
            + "print(sorted(m for m in sys.modules if m.startswith('dpo_core.local')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_server_modules_stay_small():
    sizes = {path.name: len(path.read_text().splitlines()) for path in (PACKAGE / "local").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_ids_round_trip_to_their_session():
    model_id = ids.training_model_id("local-abc", 3)
    sampler_id = ids.sampler_id("local-abc", 7)
    assert model_id == "local-abc:train:3" and sampler_id == "local-abc:sample:7"  # Tinker's convention
    assert ids.session_of(model_id) == ids.session_of(sampler_id) == "local-abc"
    assert ids.belongs_to("local-abc", model_id) and not ids.belongs_to("local-ab", model_id)
    assert ids.is_valid_run_id(model_id) and not ids.is_valid_run_id("..") and not ids.is_valid_run_id("a/b")


@pytest.mark.parametrize("path", [
    "tinker://../../etc/weights/passwd", "tinker://run/weights/..", "tinker://run/sampler_weights/a/b",
    "file:///etc/passwd", "tinker://run/other/x", "tinker://run/weights/a b",
])
def test_checkpoint_store_refuses_paths_outside_storage(tmp_path, path):
    with pytest.raises(UserError):
        CheckpointStore(tmp_path).resolve(path)


def test_checkpoint_writes_replace_whole_folders_and_list_back(tmp_path):
    import torch

    store = CheckpointStore(tmp_path)
    meta = {"base_model": "local/tiny", "lora": {"rank": 2}, "model_id": "s:train:0", "steps": 1}
    first = store.write("s:train:0", "weights", "final", meta=meta, adapter_state={"a": torch.ones(2)},
                        optimizer_state={"state": {}}, overwrite=False)
    assert first == "tinker://s:train:0/weights/final"
    with pytest.raises(UserError, match="already exists"):
        store.write("s:train:0", "weights", "final", meta=meta, adapter_state={"a": torch.ones(2)},
                    optimizer_state=None, overwrite=False)
    store.write("s:train:0", "weights", "final", meta={**meta, "steps": 2}, adapter_state={"a": torch.zeros(2)},
                optimizer_state=None, overwrite=True)
    folder = store.resolve(first).folder
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_model.safetensors", "meta.json"]  # no stale optimizer
    assert store.read_meta(first)["steps"] == 2
    assert float(store.load_adapter(first, "cpu")["a"].sum()) == 0
    assert [c["tinker_path"] for c in store.list_all()] == [first]
    assert not list(folder.parent.glob(".*"))  # no temporary folder left behind
    store.delete("s:train:0", "weights/final")
    assert store.list("s:train:0") == []
    with pytest.raises(UserError, match="invalid checkpoint name|must be 1-128"):
        store.write("s:train:0", "weights", "../x", meta=meta, adapter_state={}, optimizer_state=None, overwrite=True)
