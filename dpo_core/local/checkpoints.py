"""The local server's checkpoint store: `tinker://` paths <-> folders under its storage root.

`tinker://<run>/<weights|sampler_weights>/<name>` is the folder `<storage>/runs/<run>/<kind>/<name>/` holding
`adapter_model.safetensors` (peft's key layout), `meta.json` (base model, LoRA config, steps) and, for a
training state (`weights`), `optimizer.pt`. A path that does not resolve inside the storage root is refused.
Writes go through a temporary folder that is then swapped in: a new name is one rename, an overwrite one
atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`), so at every instant the name holds either the whole old
checkpoint or the whole new one, even under kill -9. Deletes rename the folder away before removing it.
Leftovers of interrupted writes and deletes (dot-folders) are removed when the store opens.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dpo_core.local import ids
from dpo_core.local.validation import CHECKPOINT_NAME_RE, UserError, check_checkpoint_name

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100

# path segment -> the SDK's checkpoint_type; external weights are what save_weights_external exports for download
KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
EXTERNAL_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what an external checkpoint's URLs serve


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
        self.clean_leftovers()

    def clean_leftovers(self) -> int:
        """Remove what interrupted writes and deletes left (temporary dot-folders); returns how many."""
        removed = 0
        kind_dirs = [run / kind for run in self.runs_dir.iterdir() if run.is_dir() for kind in KINDS
                     if (run / kind).is_dir()]
        for kind_dir in kind_dirs:
            for leftover in kind_dir.glob(".*"):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed += 1
        return removed

    def resolve(self, tinker_path: str) -> CheckpointRef:
        """`tinker://<run>/<weights|sampler_weights>/<name>` -> its folder, refusing anything outside storage."""
        if not isinstance(tinker_path, str) or not tinker_path.startswith("tinker://"):
            raise UserError(f"not a tinker:// path: {tinker_path!r}")
        parts = tinker_path[len("tinker://"):].split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            raise UserError(f"invalid tinker path {tinker_path!r}: expected tinker://<run>/weights|sampler_weights/<name>")
        run, kind, name = parts
        if not ids.is_valid_run_id(run) or not CHECKPOINT_NAME_RE.fullmatch(name) or name in (".", ".."):
            raise UserError(f"invalid tinker path {tinker_path!r}: names may use letters, digits, '.', '_', '-', ':'")
        folder = (self.runs_dir / run / kind / name).resolve()
        if not folder.is_relative_to(self.runs_dir):
            raise UserError(f"tinker path {tinker_path!r} escapes the server's storage")
        return CheckpointRef(run, kind, name, folder)

    def write(self, run_id: str, kind: str, name: str, *, meta: dict[str, Any],
              adapter_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None,
              overwrite: bool, extra_files: dict[str, bytes] | None = None) -> str:
        """Write one checkpoint atomically and return its `tinker://` path."""
        from safetensors.torch import save_file

        check_checkpoint_name(name)
        path = f"tinker://{run_id}/{kind}/{name}"
        folder = self.resolve(path).folder
        if folder.exists() and not overwrite:
            raise UserError(f"checkpoint {path} already exists (pass overwrite=True to replace it)")
        for key, value in adapter_state.items():  # a NaN checkpoint would poison every run resumed from it
            if not torch.isfinite(value).all():
                raise UserError(f"refusing to save {path}: weight {key} holds NaN or inf")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.new-", dir=folder.parent))
        try:
            save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_state.items()},
                      str(tmp / "adapter_model.safetensors"))
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / "optimizer.pt")
            for file_name, content in (extra_files or {}).items():
                (tmp / file_name).write_bytes(content)
            (tmp / "meta.json").write_text(json.dumps({**meta, "kind": kind, "name": name, "time": iso_time()}))
            _fsync_folder(tmp)
            if folder.exists():
                _exchange(tmp, folder)  # tmp now holds the old checkpoint
            else:
                os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def read_meta(self, tinker_path: str, allow_expired: bool = False) -> dict[str, Any]:
        """A checkpoint's meta.json, with the fields every reader indexes checked (a user error if not, and for a
        checkpoint past its time to live unless `allow_expired`)."""
        folder = self.resolve(tinker_path).folder
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except FileNotFoundError:
            raise UserError(f"checkpoint not found: {tinker_path}") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"checkpoint {tinker_path} is corrupt: meta.json cannot be read ({exc})") from None
        lora = meta.get("lora") if isinstance(meta, dict) else None
        if not (isinstance(lora, dict) and isinstance(lora.get("rank"), int)
                and isinstance(meta.get("base_model"), str)):
            raise UserError(f"checkpoint {tinker_path} is corrupt: meta.json lacks base_model or lora.rank")
        expires_at = meta.get("expires_at")
        if not allow_expired and isinstance(expires_at, (int, float)) and time.time() >= expires_at:
            raise UserError(f"checkpoint {tinker_path} expired at {iso_time(expires_at)} (it was saved with a "
                            "time to live): it can no longer be loaded or sampled")
        return meta

    def load_adapter(self, tinker_path: str, device: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        with _unreadable(tinker_path, "adapter_model.safetensors"):
            return load_file(str(self.resolve(tinker_path).folder / "adapter_model.safetensors"), device=device)

    def load_optimizer(self, tinker_path: str, device: str) -> dict[str, Any]:
        ref = self.resolve(tinker_path)
        if ref.kind != "weights":
            raise UserError(f"{tinker_path} is a sampler checkpoint: it has no optimizer state")
        with _unreadable(tinker_path, "optimizer.pt"):
            return torch.load(ref.folder / "optimizer.pt", map_location=device)

    def run_ids(self) -> list[str]:
        if not self.runs_dir.exists():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir() if p.is_dir() and ids.is_valid_run_id(p.name))

    def list(self, run_id: str) -> list[dict[str, Any]]:
        """The checkpoints of one run, as the SDK's REST `Checkpoint` records."""
        if not ids.is_valid_run_id(run_id):
            raise UserError(f"invalid training run id {run_id!r}")
        found = []
        for kind, checkpoint_type in KINDS.items():
            folder = self.runs_dir / run_id / kind
            for ckpt in sorted(folder.iterdir()) if folder.is_dir() else []:
                if ckpt.name.startswith("."):  # a write or delete in progress (or interrupted)
                    continue
                try:  # a folder deleted or broken under us is skipped, never a failed listing
                    meta = json.loads((ckpt / "meta.json").read_text())
                    size = sum(p.stat().st_size for p in ckpt.iterdir())
                except (OSError, ValueError):
                    continue
                found.append({
                    "checkpoint_id": f"{kind}/{ckpt.name}", "checkpoint_type": checkpoint_type,
                    "time": meta.get("time", iso_time()), "tinker_path": f"tinker://{run_id}/{kind}/{ckpt.name}",
                    "size_bytes": size,
                    "expires_at": iso_time(meta["expires_at"]) if isinstance(meta.get("expires_at"),
                                                                              (int, float)) else None,
                })
        return found

    def list_all(self) -> list[dict[str, Any]]:
        return [c for run_id in self.run_ids() for c in self.list(run_id)]

    def delete(self, run_id: str, checkpoint_id: str) -> None:
        folder = self.resolve(f"tinker://{run_id}/{checkpoint_id}").folder
        if not folder.exists():
            raise UserError(f"checkpoint not found: tinker://{run_id}/{checkpoint_id}")
        # Renamed away first: a crash mid-removal leaves a dot-folder (cleaned at start-up), not half a checkpoint.
        doomed = Path(tempfile.mkdtemp(prefix=f".{folder.name}.deleted-", dir=folder.parent))
        os.rename(folder, doomed / folder.name)
        shutil.rmtree(doomed, ignore_errors=True)
        for empty in (folder.parent, folder.parent.parent):  # a run with no checkpoint left is no run
            try:
                empty.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def _unreadable(tinker_path: str, file_name: str) -> Iterator[None]:
    """A missing or corrupt checkpoint file is the client's to fix (another checkpoint), never worth a retry."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"checkpoint {tinker_path} is incomplete: it has no {file_name}") from None
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        raise UserError(f"checkpoint {tinker_path} is corrupt: {file_name} cannot be read "
                        f"({type(exc).__name__}: {exc})") from None


def _fsync_folder(folder: Path) -> None:
    """Flush a finished checkpoint's files before it takes the name: a power cut must not swap in holes."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two folders (Linux renameat2); elsewhere, move `b` aside then rename (tiny window)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        error = ctypes.get_errno()
        if error not in (errno.EINVAL, errno.ENOSYS):  # not "unsupported here": a real failure
            raise OSError(error, os.strerror(error), str(b))
    aside = Path(tempfile.mkdtemp(prefix=f".{b.name}.old-", dir=b.parent))
    os.rename(b, aside / b.name)
    os.rename(a, b)
    os.rename(aside / b.name, a)
    aside.rmdir()
