"""Which code computed a result: a digest of the project's source and of the libraries that shape numbers.

Prefect's cache keys and the evaluation folders' `summary.json` both carry it, so a result is reused only by the
code that would compute it again.
"""

from __future__ import annotations

import functools
import hashlib
from importlib.metadata import version
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Every folder of code a task runs: the library (server included) and the tasks themselves. Flows only
# compose tasks, so they shape no result.
CODE_FOLDERS = ("dpo_core", "tasks")
# Libraries whose upgrade can change a number (tokenization, rendering, the SDK's loss plumbing, kernels).
PINNED_LIBRARIES = ("tinker", "tinker-cookbook", "torch", "transformers")


@functools.lru_cache(maxsize=None)
def code_fingerprint(root: Path = PROJECT_ROOT) -> str:
    """sha256 over every `.py` file under `CODE_FOLDERS` (path and bytes) and the pinned library versions.

    Computed once per process: that is the code this process has loaded, even if the files change under it.
    """
    digest = hashlib.sha256()
    for folder in CODE_FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\x00" + path.read_bytes() + b"\x00")
    for library in PINNED_LIBRARIES:
        digest.update(f"{library}=={version(library)}\x00".encode())
    return digest.hexdigest()
