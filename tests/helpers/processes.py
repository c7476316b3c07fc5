"""Processes a test starts in their own session (`start_new_session=True`), stopped with their children."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM the process group (a shutdown the code under test must handle), SIGKILL it if it outlives
    `timeout_s`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
