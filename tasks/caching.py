"""Cache keys on *content*: dataset bytes, configs, checkpoint paths and the source that computes the result.

Prefect's INPUTS policy would hash a path string, so an edited dataset file would hit a stale cache; these
keys hash the file's bytes instead. A key also covers the task's own source and the library modules doing
the work, so a code change recomputes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel


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


def _sources(context: Any, modules: tuple[ModuleType, ...]) -> list[bytes]:
    sources = [inspect.getsource(context.task.fn).encode()]
    sources += [Path(module.__file__).read_bytes() for module in modules]
    return sources


def file_bytes_hash(path: str | Path) -> str:
    from dpo_core.data import content_hash

    return content_hash(Path(path))


def keyed_on(*modules: ModuleType, files: tuple[str, ...] = (), extra=None):
    """A cache_key_fn: task source + `modules`' source + parameters + the bytes of files named by parameters.

    `files` names parameters holding paths (or lists of paths) whose *contents* enter the key; `extra` is a
    function of the parameters returning more key material (e.g. the hash of a file they imply).
    """

    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        contents = []
        for name in files:
            value = parameters.get(name)
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if path is not None and Path(str(path)).exists():
                    contents.append(file_bytes_hash(path))
        more = extra(parameters) if extra else None
        return _digest(*_sources(context, modules), parameters, contents, more)

    return key_fn


def still_there(path_key: str, marker: str):
    """A validity check for cached results that point at files: `result[path_key]/marker` must exist."""

    def check(result: Any) -> bool:
        folder = result if isinstance(result, str) else (result or {}).get(path_key)
        return folder is not None and (Path(folder) / marker).exists()

    return check


def run_fresh_if_gone(task: Any, is_valid, *args: Any, **kwargs: Any) -> Any:
    """Run a cached task; if its cached result points at files since deleted, run it again (refreshing the cache)."""
    result = task(*args, **kwargs)
    if is_valid(result):
        return result
    return task.with_options(refresh_cache=True)(*args, **kwargs)
