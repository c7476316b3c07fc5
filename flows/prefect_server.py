"""Prefect's temporary server for one command-line run, started before the flow's imports instead of after.

Without a Prefect server configured, Prefect starts a temporary one the first time a flow talks to its API: only
after this process has imported everything, and after importing the whole server package (FastAPI, SQLAlchemy,
every API route: ~3-7 s) just to launch it in a subprocess, which then imports all of it again and runs the
database migrations. Here `start_early()` launches the same server (Prefect's app, its UI off, in ephemeral mode)
as the very first thing an entry point does, so its start-up overlaps this process's imports, and `connect()`
points Prefect at it just before the flow runs. Its database migrations run only when the database is not
already at the revision this Prefect version last migrated it to (a memo in PREFECT_HOME).

    python flows/prefect_server.py FD [PARENT_PID]   # the server itself, on the listening socket FD it
                                                    # inherits; it ends when PARENT_PID dies
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What Prefect's own temporary server runs with (prefect/server/api/server.py, SubprocessASGIServer).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
MIGRATION_MEMO = "dpo_suite_migrated.json"


def prefect_env_defaults() -> None:
    """Analytics off, and a patient temporary-server start-up (a loaded 2-vCPU machine took 120 s once)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


class TemporaryServer:
    """The server process and the socket it serves; stopped when this process exits."""

    def __init__(self) -> None:
        # Bound and listening here, then inherited: no port can be taken in between, and a request made before
        # the server is up waits in the socket's backlog instead of failing.
        self.socket = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.api_url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/api"
        fd = self.socket.fileno()
        # -P: the script's folder (flows/) is not put on the server's sys.path, so no module here shadows one of
        # Prefect's.
        self.process = subprocess.Popen([sys.executable, "-P", str(Path(__file__).resolve()), str(fd),
                                         str(os.getpid())], pass_fds=[fd], env={**os.environ, **SERVER_ENV})
        # The server holds the socket now; once it exits, a request is refused rather than left waiting.
        self.socket.close()
        atexit.register(self.stop)  # registered before Prefect's exit hooks, so it runs after they flush

    def wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect's temporary server exited with code {self.process.returncode} "
                                   "before it was ready (its error is printed above)")
            try:  # waits in the socket's backlog until the server answers, or fails at once if it has exited
                with urllib.request.urlopen(f"{self.api_url}/health",
                                            timeout=max(deadline - time.monotonic(), 1)) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Prefect's temporary server was not ready after {timeout_s:.0f} s "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_early: TemporaryServer | None = None


def start_early() -> None:
    """Start the temporary server now, unless PREFECT_API_URL names a server. Call it first thing in a flow
    script's `__main__`, before the imports, then `connect()` before running the flow."""
    global _early
    prefect_env_defaults()
    if _early is None and not os.environ.get("PREFECT_API_URL"):
        _early = TemporaryServer()


def connect() -> None:
    """Point Prefect (this process, its threads and children) at the server `start_early()` started.

    A PREFECT_API_URL from Prefect's profile or prefect.toml (unknown before Prefect is imported) wins: the early
    server is stopped, unused."""
    global _early
    if _early is None:
        return
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    from tasks.setup import TEMPORARY_API_URL_ENV

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        _early.stop()
        _early = None
        return
    _early.wait_until_ready(settings.server.ephemeral.startup_timeout_seconds)
    os.environ["PREFECT_API_URL"] = os.environ[TEMPORARY_API_URL_ENV] = _early.api_url
    refresh_global_settings_context()  # Prefect read its settings on import, before the URL was set


# --- the server process ---

def _sqlite_revision(database: Path) -> str | None:
    import sqlite3

    if not database.exists():
        return None
    try:
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            return connection.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        finally:
            connection.close()
    except (sqlite3.Error, TypeError):
        return None


def migrations_memo(settings: Any) -> tuple[bool, Callable[[], None]]:
    """Whether Prefect's database is at the revision this Prefect version last migrated it to (SQLite only: its
    migrations on start can then be skipped), and what to call once the server is up: record the revision."""
    import prefect

    secret = settings.server.database.connection_url  # filled in by Prefect: PREFECT_HOME/prefect.db by default
    url = secret.get_secret_value() if secret is not None else ""
    if not url.startswith("sqlite") or ":memory:" in url or not settings.server.database.migrate_on_start:
        return False, lambda: None
    database = Path(url.split(":///", 1)[-1].split("?", 1)[0]).expanduser().resolve()
    memo_path = Path(settings.home).expanduser() / MIGRATION_MEMO
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    key = f"prefect {prefect.__version__} {database}"
    revision = _sqlite_revision(database)
    if revision is not None and memo.get(key) == revision:
        return True, lambda: None

    def record() -> None:
        migrated = _sqlite_revision(database)
        if migrated is not None:
            memo[key] = migrated
            tmp = memo_path.with_name(f".{MIGRATION_MEMO}.{os.getpid()}")
            tmp.write_text(json.dumps(memo, indent=1))
            tmp.replace(memo_path)

    return False, record


def die_with_parent(parent_pid: int) -> None:
    """On Linux, have the kernel send this process SIGTERM when the process that started it dies, also by SIGKILL
    (the out-of-memory killer, `kill -9`), which runs no atexit hook: no orphaned server is left holding its
    port and database. Exits at once if that process is already gone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the request above
        sys.exit(0)


def serve(fd: int) -> None:
    """Prefect's server app (as Prefect's temporary server runs it) on the inherited listening socket `fd`."""
    import threading

    import uvicorn
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    current, record = migrations_memo(get_current_settings())
    if current:
        os.environ["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] = "false"
        refresh_global_settings_context()
    server = uvicorn.Server(uvicorn.Config("prefect.server.api.server:create_app", factory=True,
                                           log_level="error", lifespan="on"))

    def record_when_started() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.1)
        if server.started:
            record()

    threading.Thread(target=record_when_started, daemon=True).start()
    server.run(sockets=[socket.socket(fileno=fd)])


if __name__ == "__main__":
    if len(sys.argv) > 2:
        die_with_parent(int(sys.argv[2]))
    serve(int(sys.argv[1]))
