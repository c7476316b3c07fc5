"""The temporary Prefect server's migration memo: a database this Prefect version has migrated is not migrated
again on the next start (seconds of every CLI run), and any other database is."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

from pydantic import SecretStr

from flows.prefect_server import migrations_memo


def _settings(home, url=None, migrate_on_start=True):
    url = url or f"sqlite+aiosqlite:///{home}/prefect.db"
    return SimpleNamespace(home=home, server=SimpleNamespace(database=SimpleNamespace(
        connection_url=SecretStr(url), migrate_on_start=migrate_on_start)))


def _set_revision(home, revision):
    with sqlite3.connect(home / "prefect.db") as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS alembic_version (version_num VARCHAR(32) NOT NULL)")
        connection.execute("DELETE FROM alembic_version")
        connection.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
    connection.close()


def test_migrations_skipped_only_at_the_revision_recorded_after_a_migrated_start(tmp_path):
    assert migrations_memo(_settings(tmp_path))[0] is False  # no database yet: Prefect creates it
    _set_revision(tmp_path, "aaa")
    current, record = migrations_memo(_settings(tmp_path))
    assert current is False  # never recorded: migrate
    record()  # the server came up after migrating
    assert migrations_memo(_settings(tmp_path))[0] is True
    _set_revision(tmp_path, "bbb")  # changed since (another Prefect version, a restored file)
    assert migrations_memo(_settings(tmp_path))[0] is False
    (tmp_path / "prefect.db").unlink()
    assert migrations_memo(_settings(tmp_path))[0] is False


def test_other_databases_always_migrate(tmp_path):
    _set_revision(tmp_path, "aaa")
    migrations_memo(_settings(tmp_path))[1]()
    assert migrations_memo(_settings(tmp_path, url="postgresql+asyncpg://u:p@db/prefect"))[0] is False
    assert migrations_memo(_settings(tmp_path, migrate_on_start=False))[0] is False  # the user's choice stands


def test_the_early_server_ends_when_its_parent_is_killed(tmp_path):
    """A CLI process killed with SIGKILL (as the out-of-memory killer does) runs no exit hook: the kernel still
    ends the temporary server it started, instead of leaving it orphaned."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    if not sys.platform.startswith("linux"):
        import pytest

        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    root = Path(__file__).resolve().parents[2]
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from flows import prefect_server; "
              "prefect_server.start_early(); print(prefect_server._early.process.pid, flush=True); time.sleep(300)")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_API_URL": ""}
    env.pop("PREFECT_API_URL")
    parent = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True, env=env)
    server_pid = int(parent.stdout.readline())
    time.sleep(1.0)  # the server has set its death signal by now (the first thing it does)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            return  # gone (and reaped by init)
        try:
            with open(f"/proc/{server_pid}/stat") as stat:
                if stat.read().split(")")[-1].split()[0] == "Z":
                    return  # a zombie: it has exited
        except FileNotFoundError:
            return
        time.sleep(0.2)
    os.kill(server_pid, signal.SIGKILL)
    raise AssertionError("the temporary server outlived its killed parent")
