"""The key=value command line shared by the flows' entry points: one-line errors, exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from dpo_core.config import ConfigError, build_config, parse_key_values


def parse_config(model: Any, argv: list[str], prepare: Callable[[dict], dict] | None = None) -> Any | None:
    """`key=value` arguments -> a validated config, or None after printing the one-line error."""
    try:
        values = parse_key_values(argv, model)
        return build_config(model, prepare(values) if prepare else values)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def exit_code(state: Any) -> int:
    """0 for a completed flow run; else print its error on one line and return 1."""
    if state.is_completed():
        return 0
    error = state.result(raise_on_failure=False)
    print(f"error: {error if isinstance(error, BaseException) else state.message}", file=sys.stderr)
    return 1
