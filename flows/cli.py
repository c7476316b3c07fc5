"""The key=value command line shared by the flows' entry points: `--help`, one-line errors, exit codes.

A user's mistake (an unknown key, a bad value, too few steps, a missing dataset, a bad dataset row) ends the
command with one `error:` line and exit code 1: it is caught before the flow starts where it can be (the config
and the cheap pre-flight checks), and a user error raised inside a flow run is logged without its traceback.
`--debug` (or `DPO_DEBUG=1`) keeps every traceback.

Imports only the standard library at module level: `flows/suite.py` asks `answer_help` before it starts Prefect's
temporary server, and `--help` answers before Prefect (or torch) is imported.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

HELP_ARGS = ("--help", "-h", "help")
DEBUG_ARG = "--debug"


def answer_help(entry: str, argv: list[str], program: str | None = None) -> None:
    """When `argv` asks for help (`--help`, `-h` or `help`), print the entry point's keys and exit 0."""
    if any(arg in HELP_ARGS for arg in argv):
        from dpo_core.config_docs import help_text

        try:
            print(help_text(entry, program), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)


def take_debug_flag(argv: list[str]) -> list[str]:
    """`argv` without `--debug`, which turns debug output on for this process and the flow runs it starts."""
    if DEBUG_ARG in argv:
        os.environ["DPO_DEBUG"] = "1"
    return [arg for arg in argv if arg != DEBUG_ARG]


def debug_on() -> bool:
    return os.environ.get("DPO_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions whose message is the whole story for the user (it names the key, file, row and fix)."""
    from dpo_core.backend import UnsupportedModelError
    from dpo_core.config import ConfigError
    from dpo_core.data import DatasetError, DatasetNotFoundError

    return ConfigError, DatasetError, DatasetNotFoundError, UnsupportedModelError


def print_error(exc: BaseException | str) -> None:
    print(f"error: {exc}", file=sys.stderr)


def parse_config(model: Any, argv: list[str], prepare: Callable[[dict], dict] | None = None) -> Any | None:
    """`key=value` arguments -> a validated config, or None after printing the one-line error."""
    from dpo_core.config import ConfigError, build_config, parse_key_values

    try:
        values = parse_key_values(argv, model)
        return build_config(model, prepare(values) if prepare else values)
    except ConfigError as exc:
        print_error(exc)
        return None


def preflight(check: Callable[[], Any]) -> bool:
    """Run a cheap check before the flow starts (validate the dataset, count the steps); False after printing
    the one-line error of a user error. Other exceptions propagate: they are bugs, and keep their traceback."""
    try:
        check()
        return True
    except user_errors() as exc:
        if debug_on():
            raise
        print_error(exc)
        return False


class _WithoutUserTraceback(logging.Formatter):
    """Formats as `inner` does, minus the traceback of a user error: its message names the fix already."""

    def __init__(self, inner: logging.Formatter, errors: tuple[type[BaseException], ...]):
        super().__init__()
        self.inner, self.errors = inner, errors

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and isinstance(record.exc_info[1], self.errors):
            # A copy: the same record also goes to Prefect's API handler (the UI keeps the traceback).
            record = copy.copy(record)
            record.exc_info, record.exc_text = None, None
        return self.inner.format(record)


def quiet_user_tracebacks() -> None:
    """Log a user error raised inside a flow run as its message alone on the console (Prefect logs ~80 lines
    of traceback for it otherwise); the traceback stays in the run's logs in the Prefect UI, and on the console
    with --debug. Call it after Prefect is imported (that configures its console handler)."""
    if debug_on():
        return
    errors = user_errors()
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter or logging.Formatter()
        if not isinstance(formatter, _WithoutUserTraceback):
            handler.setFormatter(_WithoutUserTraceback(formatter, errors))


def exit_code(state: Any) -> int:
    """0 for a completed flow run; else print its error on one line and return 1."""
    if state.is_completed():
        return 0
    error = state.result(raise_on_failure=False)
    print_error(error if isinstance(error, BaseException) else state.message)
    return 1
