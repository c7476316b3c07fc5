"""Run one function on several threads at once and wait for all of them (contention tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def run_on_threads(target: Callable[..., Any], args_per_thread: list[tuple]) -> None:
    """Start one thread per argument tuple, then join them all; the target records its own errors."""
    threads = [threading.Thread(target=target, args=args) for args in args_per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
