"""The checkpoint registry of an experiment (append-only `checkpoints.jsonl`) and the index of experiments."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_core.records import CheckpointRecord, RunConfig


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records; a torn last line (a crash mid-write) is ignored, everything before it kept."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line and flush it to disk, so a crash loses nothing already written."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_checkpoints(run_dir: str | Path) -> list[CheckpointRecord]:
    """Every complete row of `<run_dir>/checkpoints.jsonl`, oldest first."""
    return [CheckpointRecord.model_validate(r) for r in read_jsonl(Path(run_dir) / "checkpoints.jsonl")]


def final_record(run_dir: str | Path) -> CheckpointRecord:
    """The last `final` row of an experiment's checkpoints.jsonl."""
    records = [r for r in read_checkpoints(run_dir) if r.name == "final"]
    if not records:
        raise FileNotFoundError(f"{run_dir} has no final checkpoint yet (checkpoints.jsonl has no 'final' row)")
    return records[-1]


def final_sampler_path(run_dir: str | Path) -> str:
    """What inference needs: the `sampler_path` of the final checkpoint."""
    return final_record(run_dir).sampler_path


@dataclass(frozen=True)
class ExperimentStatus:
    name: str
    path: str
    status: str  # "finished" | "interrupted" | "not started"
    steps_done: int
    model_name: str | None
    dataset: str | None
    sampler_path: str | None


def list_experiments(experiments_dir: str | Path) -> list[ExperimentStatus]:
    """Every run folder under `experiments_dir` with its status, newest name last."""
    found = []
    root = Path(experiments_dir)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and p.name != "base_models") if root.exists() else []
    for run_dir in folders:
        config = RunConfig.read_train_config(run_dir) if (run_dir / "config.json").exists() else None
        records = [r for r in read_checkpoints(run_dir) if r.state_path]
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        finished = bool(records) and records[-1].name == "final"
        status = "finished" if finished else ("interrupted" if metrics or records else "not started")
        found.append(ExperimentStatus(
            name=run_dir.name, path=str(run_dir), status=status,
            steps_done=max([r.step for r in records] + [len(metrics)]),
            model_name=config.model_name if config else None, dataset=str(config.dataset) if config else None,
            sampler_path=records[-1].sampler_path if finished else None,
        ))
    return found
