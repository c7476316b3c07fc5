"""Write-then-rename helpers: nothing half-written is ever left at a final path."""

from __future__ import annotations

import contextlib
import errno
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
        # Several processes may finish the same folder at once (two suites evaluating one base model): each
        # attempt moves the current folder aside and renames its own build in; losing a race just retries.
        for attempt in range(20):
            if folder.exists():
                if not replace:
                    break
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
                try:
                    os.rename(folder, old / folder.name)
                except FileNotFoundError:
                    pass  # another process moved it first
                finally:
                    shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, folder)
                break
            except OSError as exc:  # another build took the name between the two renames: go again
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 19:
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
