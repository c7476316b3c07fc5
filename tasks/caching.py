"""Cache keys on *content*: dataset bytes, configs, checkpoint registries, ALL project code, pinned libraries.

Prefect's INPUTS policy would hash a path string, so an edited dataset file would hit a stale cache; these
keys hash the file's bytes instead. The code part of every key is dpo_core.code_version.code_fingerprint: the
source of the whole `dpo_core` package (the local engine included) and of `tasks/`, plus the versions of the
libraries that shape numbers (a hand-kept list of "the modules this task uses" went stale the first time a task
started using a module nobody listed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dpo_core.code_version import code_fingerprint


def _canonical(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _digest(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(_canonical(part), sort_keys=True,
                                                                          default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def compute_identity(settings: Any) -> list[Any]:
    """Where a model computes and on which weights: the backend and its URL; on the local one the device and
    dtype the engine will pick (bf16 on CUDA, fp32 on CPU, as in dpo_core/local/engine.py), so a GPU result never
    answers for a CPU run, and the stand-in setting and the fingerprint of every served model's weights
    (dpo_core/local/fingerprint.py), so a name mapped to other weights (DPO_LOCAL_MODELS) is another result."""
    backend = settings.resolved_backend()
    if backend == "tinker":
        return [backend, settings.tinker_base_url or "default"]
    from dpo_core.local.fingerprint import served_fingerprints

    device = settings.local_device
    if device == "auto":
        device = "cuda" if _cuda_available() else "cpu"
    return [backend, device, "bfloat16" if device == "cuda" else "float32", settings.local_stand_in,
            served_fingerprints(settings.cache_dir, settings.local_models, settings.local_stand_in)]


def _cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch (~4 s of a cached rerun) where no GPU driver is
    installed: without the NVIDIA driver (or ROCm's /dev/kfd) torch cannot see a GPU either."""
    if not (Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()
            or Path("/dev/kfd").exists()):
        return False
    import torch

    return torch.cuda.is_available()


def file_bytes_hash(path: str | Path) -> str:
    from dpo_core.data import content_hash

    return content_hash(Path(path))


def content_key(files: tuple[str, ...] = (), extra: Callable[[dict[str, Any]], Any] | None = None):
    """A cache_key_fn: all project code + parameters + the bytes of files named by parameters + `extra`.

    `files` names parameters holding paths (or lists of paths) whose *contents* enter the key; `extra` is a
    function of the parameters returning more key material (e.g. the hash of a file they imply, the backend).
    """

    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        contents = []
        for name in files:
            value = parameters.get(name)
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if path is not None and Path(str(path)).exists():
                    contents.append(file_bytes_hash(path))
        more = extra(parameters) if extra else None
        return _digest(code_fingerprint(), parameters, contents, more)

    return key_fn


def still_there(path_key: str, marker: str) -> Callable[[Any], bool]:
    """A validity check for cached results that point at files: `result.<path_key>/marker` must exist."""

    def check(result: Any) -> bool:
        if isinstance(result, str):
            folder = result
        elif isinstance(result, BaseModel):
            folder = getattr(result, path_key)
        else:
            folder = (result or {}).get(path_key)
        return folder is not None and (Path(folder) / marker).exists()

    return check


def file_exists(path: str) -> bool:
    """A validity check for cached results that are a file's path."""
    return Path(path).exists()


def run_fresh_if_gone(task: Any, is_valid: Callable[[Any], bool], *args: Any, **kwargs: Any) -> Any:
    """Run a cached task; if its cached result points at files since deleted, run it again (refreshing the cache)."""
    result = task(*args, **kwargs)
    if is_valid(result):
        return result
    return task.with_options(refresh_cache=True)(*args, **kwargs)


def results_fresh_if_gone(task: Any, is_valid: Callable[[Any], bool], calls: list[dict[str, Any]]) -> list[Any]:
    """Submit every call of `task` together (they run concurrently), then as `run_fresh_if_gone` per result."""
    futures = [task.submit(**call) for call in calls]
    results = []
    for call, future in zip(calls, futures):
        result = future.result()
        results.append(result if is_valid(result) else task.with_options(refresh_cache=True)(**call))
    return results
