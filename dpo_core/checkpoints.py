"""The checkpoint registry of an experiment (append-only `checkpoints.jsonl`) and the index of experiments."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def final_record(run_dir: str | Path) -> dict[str, Any]:
    """The last `final` row of an experiment's checkpoints.jsonl."""
    records = [r for r in read_jsonl(Path(run_dir) / "checkpoints.jsonl") if r.get("name") == "final"]
    if not records:
        raise FileNotFoundError(f"{run_dir} has no final checkpoint yet (checkpoints.jsonl has no 'final' row)")
    return records[-1]


def final_sampler_path(run_dir: str | Path) -> str:
    """What inference needs: the `sampler_path` of the final checkpoint."""
    return final_record(run_dir)["sampler_path"]


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
        config_file = run_dir / "config.json"
        config = json.loads(config_file.read_text()).get("train_config", {}) if config_file.exists() else {}
        records = [r for r in read_jsonl(run_dir / "checkpoints.jsonl") if r.get("state_path")]
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        finished = bool(records) and records[-1].get("name") == "final"
        status = "finished" if finished else ("interrupted" if metrics or records else "not started")
        found.append(ExperimentStatus(
            name=run_dir.name, path=str(run_dir), status=status,
            steps_done=max([int(r.get("step", 0)) for r in records] + [len(metrics)]),
            model_name=config.get("model_name"), dataset=None if not config else str(config.get("dataset")),
            sampler_path=records[-1]["sampler_path"] if finished else None,
        ))
    return found
