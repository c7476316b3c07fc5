"""Issue 14: checkpoints survive kill -9 mid-overwrite, leftovers are cleaned at start-up, listings never fail on
an empty or half-deleted run, and names are matched in full."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import httpx
import pytest
import torch

from dpo_core.local.checkpoints import CheckpointStore
from dpo_core.local.validation import UserError
from dpo_core.settings import Settings

RUN = "local-abc:train:0"
META = {"base_model": "local/tiny", "lora": {"rank": 2}, "model_id": RUN}


def _write(store: CheckpointStore, generation: int) -> str:
    return store.write(RUN, "weights", "final", meta={**META, "steps": generation},
                       adapter_state={"a": torch.full((256, 256), float(generation))},
                       optimizer_state={"state": {}, "blob": torch.zeros(200_000)}, overwrite=True)


def test_kill_9_during_overwrites_never_loses_the_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    path = _write(store, 0)
    rng = random.Random(3)
    for attempt in range(12):
        child = os.fork()
        if child == 0:  # the writer: overwrites the same name until it is killed
            try:
                generation = 1
                while True:
                    _write(store, generation)
                    generation += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        reopened = CheckpointStore(tmp_path)  # start-up: leftovers of the killed write are cleaned
        meta = reopened.read_meta(path)  # the name always holds one whole checkpoint, old or new
        adapter = reopened.load_adapter(path, "cpu")["a"]
        assert float(adapter[0, 0]) == float(adapter[-1, -1]) == meta["steps"]
        assert (reopened.resolve(path).folder / "optimizer.pt").exists()
        assert not [p.name for p in reopened.resolve(path).folder.parent.iterdir() if p.name.startswith(".")]


def test_leftovers_of_interrupted_saves_are_cleaned_at_start_up(tmp_path):
    store = CheckpointStore(tmp_path)
    _write(store, 1)
    kind_dir = store.resolve(f"tinker://{RUN}/weights/final").folder.parent
    (kind_dir / ".final.new-x1y2").mkdir()
    (kind_dir / ".final.new-x1y2" / "adapter_model.safetensors").write_bytes(b"half")
    (kind_dir / ".other.aaaa").mkdir()  # the older temp naming
    reopened = CheckpointStore(tmp_path)
    assert sorted(p.name for p in kind_dir.iterdir()) == ["final"]
    assert [c["checkpoint_id"] for c in reopened.list(RUN)] == ["weights/final"]


def test_listing_survives_empty_and_half_deleted_runs(tmp_path, registered):
    from dpo_core.local.launcher import local_server

    with local_server(Settings(cache_dir=registered, local_storage=tmp_path)) as running, httpx.Client(
            base_url=f"{running.base_url}/api/v1", headers={"X-API-Key": running.api_key}, timeout=30) as http:
        store = running.engine.checkpoints
        _write(store, 1)
        store.write("other:train:0", "sampler_weights", "s1", meta={**META, "model_id": "other:train:0"},
                    adapter_state={"a": torch.zeros(2)}, optimizer_state=None, overwrite=False)
        (store.runs_dir / "empty:train:9" / "weights").mkdir(parents=True)  # a run folder with nothing in it
        broken = store.runs_dir / "broken:train:1" / "weights" / "half"
        broken.mkdir(parents=True)
        (broken / "meta.json").write_text("{trunc")  # a half-written or half-deleted checkpoint

        assert http.delete(f"/training_runs/{RUN}/checkpoints/weights/final").status_code == 200
        listing = http.get("/training_runs")
        assert listing.status_code == 200, listing.text
        assert [r["training_run_id"] for r in listing.json()["training_runs"]] == ["other:train:0"]
        assert http.get("/checkpoints").json()["cursor"]["total_count"] == 1
        missing = http.get(f"/training_runs/{RUN}")
        assert missing.status_code == 404 and "not found" in missing.json()["error"]


@pytest.mark.parametrize("name", ["final\n", "a/b", "..", "", "x" * 129, "tab\tname"])
def test_checkpoint_names_are_matched_in_full(tmp_path, name):
    store = CheckpointStore(tmp_path)
    with pytest.raises(UserError):
        store.write(RUN, "weights", name, meta=META, adapter_state={"a": torch.zeros(2)}, optimizer_state=None,
                    overwrite=True)
    with pytest.raises(UserError):
        store.resolve(f"tinker://{RUN}/weights/{name}")
    assert not (store.runs_dir / RUN).exists() or not any((store.runs_dir / RUN).rglob("*\n*"))


def test_non_finite_weights_are_never_saved(tmp_path):
    store = CheckpointStore(tmp_path)
    _write(store, 1)
    with pytest.raises(UserError, match="NaN or inf"):
        store.write(RUN, "weights", "final", meta=META, adapter_state={"a": torch.tensor([1.0, float("nan")])},
                    optimizer_state=None, overwrite=True)
    assert json.loads((store.resolve(f"tinker://{RUN}/weights/final").folder / "meta.json").read_text())["steps"] == 1
