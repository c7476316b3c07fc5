"""atomic_folder under contention: many writers finishing the same folder at once all succeed, and the folder
always holds one writer's complete build."""

from __future__ import annotations

import threading

import pytest

from dpo_core.fsutil import atomic_folder
from tests.helpers.threads import run_on_threads


@pytest.mark.parametrize("replace", [True, False])
def test_concurrent_writers_of_one_folder(tmp_path, replace):
    target = tmp_path / "eval"
    barrier = threading.Barrier(8)
    errors = []

    def write(writer: int) -> None:
        try:
            with atomic_folder(target, replace=replace) as tmp:
                for name in ("samples.jsonl", "scores.parquet", "summary.json"):
                    (tmp / name).write_text(str(writer))
                barrier.wait()  # every writer renames at the same moment
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    run_on_threads(write, [(k,) for k in range(8)])
    assert errors == []
    contents = {p.name: p.read_text() for p in target.iterdir()}
    assert set(contents) == {"samples.jsonl", "scores.parquet", "summary.json"}
    assert len(set(contents.values())) == 1  # one writer's build, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # no temp or old folders left behind


def test_a_failed_build_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "report") as tmp:
            (tmp / "report.md").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
