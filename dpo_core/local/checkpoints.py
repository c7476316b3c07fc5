"""The local server's checkpoint store: `tinker://` paths <-> folders under its storage root.

`tinker://<run>/<weights|sampler_weights>/<name>` is the folder `<storage>/runs/<run>/<kind>/<name>/` holding
`adapter_model.safetensors` (peft's key layout), `meta.json` (base model, LoRA config, steps) and, for a
training state (`weights`), `optimizer.pt`. A path that does not resolve inside the storage root is refused.
Writes go through a temporary folder renamed into place, so a crash (or an overwrite) never leaves half a
checkpoint where a resume would read it.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dpo_core.fsutil import atomic_folder
from dpo_core.local import ids
from dpo_core.local.validation import CHECKPOINT_NAME_RE, UserError, check_checkpoint_name

KINDS = {"weights": "training", "sampler_weights": "sampler"}  # path segment -> the SDK's checkpoint_type


class CheckpointRef(NamedTuple):
    run_id: str
    kind: str  # "weights" | "sampler_weights"
    name: str
    folder: Path


def iso_time(timestamp: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if timestamp is None else timestamp, dt.timezone.utc).isoformat()


class CheckpointStore:
    """Checkpoint folders under `<storage>/runs/`, addressed by `tinker://` paths."""

    def __init__(self, storage: Path):
        self.storage = Path(storage).resolve()
        self.runs_dir = self.storage / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    def resolve(self, tinker_path: str) -> CheckpointRef:
        """`tinker://<run>/<weights|sampler_weights>/<name>` -> its folder, refusing anything outside storage."""
        if not isinstance(tinker_path, str) or not tinker_path.startswith("tinker://"):
            raise UserError(f"not a tinker:// path: {tinker_path!r}")
        parts = tinker_path[len("tinker://"):].split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            raise UserError(f"invalid tinker path {tinker_path!r}: expected tinker://<run>/weights|sampler_weights/<name>")
        run, kind, name = parts
        if not ids.is_valid_run_id(run) or not CHECKPOINT_NAME_RE.match(name) or name in (".", ".."):
            raise UserError(f"invalid tinker path {tinker_path!r}: names may use letters, digits, '.', '_', '-', ':'")
        folder = (self.runs_dir / run / kind / name).resolve()
        if not folder.is_relative_to(self.runs_dir):
            raise UserError(f"tinker path {tinker_path!r} escapes the server's storage")
        return CheckpointRef(run, kind, name, folder)

    def write(self, run_id: str, kind: str, name: str, *, meta: dict[str, Any],
              adapter_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None,
              overwrite: bool) -> str:
        """Write one checkpoint atomically and return its `tinker://` path."""
        from safetensors.torch import save_file

        check_checkpoint_name(name)
        path = f"tinker://{run_id}/{kind}/{name}"
        folder = self.resolve(path).folder
        if folder.exists() and not overwrite:
            raise UserError(f"checkpoint {path} already exists (pass overwrite=True to replace it)")
        with atomic_folder(folder) as tmp:
            save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_state.items()},
                      str(tmp / "adapter_model.safetensors"))
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / "optimizer.pt")
            (tmp / "meta.json").write_text(json.dumps({**meta, "kind": kind, "name": name, "time": iso_time()}))
        return path

    def read_meta(self, tinker_path: str) -> dict[str, Any]:
        folder = self.resolve(tinker_path).folder
        if not (folder / "meta.json").exists():
            raise UserError(f"checkpoint not found: {tinker_path}")
        return json.loads((folder / "meta.json").read_text())

    def load_adapter(self, tinker_path: str, device: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.resolve(tinker_path).folder / "adapter_model.safetensors"), device=device)

    def load_optimizer(self, tinker_path: str, device: str) -> dict[str, Any]:
        ref = self.resolve(tinker_path)
        if ref.kind != "weights":
            raise UserError(f"{tinker_path} is a sampler checkpoint: it has no optimizer state")
        return torch.load(ref.folder / "optimizer.pt", map_location=device)

    def run_ids(self) -> list[str]:
        return sorted(p.name for p in self.runs_dir.iterdir()) if self.runs_dir.exists() else []

    def list(self, run_id: str) -> list[dict[str, Any]]:
        """The checkpoints of one run, as the SDK's REST `Checkpoint` records."""
        if not ids.is_valid_run_id(run_id):
            raise UserError(f"invalid training run id {run_id!r}")
        found = []
        for kind, checkpoint_type in KINDS.items():
            folder = self.runs_dir / run_id / kind
            for ckpt in sorted(folder.iterdir()) if folder.exists() else []:
                if not (ckpt / "meta.json").exists():
                    continue
                meta = json.loads((ckpt / "meta.json").read_text())
                found.append({
                    "checkpoint_id": f"{kind}/{ckpt.name}", "checkpoint_type": checkpoint_type,
                    "time": meta.get("time", iso_time()), "tinker_path": f"tinker://{run_id}/{kind}/{ckpt.name}",
                    "size_bytes": sum(p.stat().st_size for p in ckpt.iterdir()),
                })
        return found

    def list_all(self) -> list[dict[str, Any]]:
        return [c for run_id in self.run_ids() for c in self.list(run_id)]

    def delete(self, run_id: str, checkpoint_id: str) -> None:
        folder = self.resolve(f"tinker://{run_id}/{checkpoint_id}").folder
        if not folder.exists():
            raise UserError(f"checkpoint not found: tinker://{run_id}/{checkpoint_id}")
        shutil.rmtree(folder)
