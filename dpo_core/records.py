"""Typed records that cross layers: a run's config.json, a checkpoints.jsonl row, a training outcome.

Every reader of these files goes through here, so the file format is written down once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict

from dpo_core.config import FrozenModel, TrainConfig

if TYPE_CHECKING:
    from dpo_core.service import ServiceIdentity


class CheckpointRecord(FrozenModel):
    """One row of `checkpoints.jsonl` (tinker-cookbook's format plus `step`)."""

    # Rows written by the cookbook's own train_dpo carry keys of its own loop: ignore them rather than refuse.
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    epoch: int = 0  # position of the *next* step (the cookbook's convention)
    batch: int = 0
    step: int = 0  # optimizer steps done
    state_path: str | None = None  # weights + optimizer: what resume needs
    sampler_path: str | None = None  # weights for sampling: what inference needs
    ttl_seconds: int | None = None  # the time to live the service was given (checkpoint_ttl); None = kept
    expires_at: float | None = None  # when the service deletes it (epoch seconds); None = never

    def expired(self, now: float | None = None) -> bool:
        import time

        return self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at

    def expired_message(self, run_dir: str | Path) -> str:
        import datetime as dt

        when = dt.datetime.fromtimestamp(self.expires_at, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (f"{run_dir}: checkpoint {self.name!r} (step {self.step}) expired on the service at {when} "
                f"(saved with checkpoint_ttl={self.ttl_seconds} s): use the run's final checkpoint, or train again")


class RunConfig(FrozenModel):
    """A run folder's `config.json`: the full TrainConfig, the dataset it trained on, renderer, versions."""

    train_config: TrainConfig
    dataset_path: str
    dataset_sha256: str
    renderer_name: str
    versions: dict[str, str]
    held_out_rows: list[int] = []  # dataset rows (0-based) of the held-out split: never trained on
    pair_rows: list[int] | None = None  # with max_pairs: the dataset rows of the subset the run used (else all)
    # dpo_core.service.ServiceIdentity.record(): the backend, endpoint, server, compute and weights fingerprint
    # the run trained on (absent in a config.json written before it was recorded).
    service: dict[str, Any] | None = None

    @classmethod
    def read(cls, run_dir: str | Path) -> RunConfig:
        """Parse `<run_dir>/config.json`; FileNotFoundError names the folder when it is missing."""
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{run_dir} is not an experiment folder (no config.json)")
        return cls.model_validate_json(path.read_text())

    @classmethod
    def read_train_config(cls, run_dir: str | Path) -> TrainConfig:
        """Only the TrainConfig of `<run_dir>/config.json`: all a folder's identity needs, so a config.json
        written by hand (or by an older version) with just `train_config` still identifies its experiment."""
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{run_dir} is not an experiment folder (no config.json)")
        return _TrainConfigOnly.model_validate_json(path.read_text()).train_config

    @classmethod
    def read_dataset_sha256(cls, run_dir: str | Path) -> str | None:
        """The dataset hash `<run_dir>/config.json` records (None in a config.json that has none)."""
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{run_dir} is not an experiment folder (no config.json)")
        return _TrainConfigOnly.model_validate_json(path.read_text()).dataset_sha256


    @classmethod
    def read_service(cls, run_dir: str | Path) -> ServiceIdentity | None:
        """The service `<run_dir>/config.json` records (None when it records none)."""
        from dpo_core.service import ServiceIdentity

        path = Path(run_dir) / "config.json"
        if not path.exists():
            return None
        service = _TrainConfigOnly.model_validate_json(path.read_text()).service
        return ServiceIdentity.from_record(service) if service else None


class _TrainConfigOnly(FrozenModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    train_config: TrainConfig
    dataset_sha256: str | None = None
    service: dict[str, Any] | None = None


class TrainOutcome(FrozenModel):
    """What training one experiment produced: where, how far, and its final checkpoint."""

    run_dir: str
    steps: int
    already_finished: bool
    final: CheckpointRecord
