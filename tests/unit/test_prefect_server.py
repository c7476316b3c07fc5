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
