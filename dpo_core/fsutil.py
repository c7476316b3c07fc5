"""Write-then-rename helpers: nothing half-written is ever left at a final path."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(folder: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder beside `folder`; when the block succeeds it becomes `folder`.

    replace=True swaps out an existing `folder`; replace=False keeps an existing one (another process built
    the same thing first) and discards this build. On an error the temp folder is removed.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        if folder.exists() and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.rename(folder, old / folder.name)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        elif not folder.exists():
            try:
                os.rename(tmp, folder)
            except OSError:
                if not folder.exists():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
