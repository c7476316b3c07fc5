"""Prefect flows under Prefect's own test harness (a temporary server), with isolated result storage."""

from __future__ import annotations

import pytest

from flows.prefect_server import prefect_env_defaults

prefect_env_defaults()  # analytics off, the patient start-up timeout: the same as the entry points


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_LOCAL_STORAGE_PATH, PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_LOCAL_STORAGE_PATH: storage,
                                 PREFECT_RESULTS_PERSIST_BY_DEFAULT: False}):
            yield


@pytest.fixture
def project_env(tmp_path, monkeypatch, registered, shipped_data):
    """Run folders, server storage and data (the tests' slice of the shipped data) in tmp; the real model cache."""
    monkeypatch.setenv("DPO_DATA_DIR", str(shipped_data))
    monkeypatch.setenv("DPO_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    monkeypatch.setenv("DPO_LOCAL_STORAGE", str(tmp_path / "storage"))
    monkeypatch.setenv("DPO_CACHE_DIR", str(registered))
    monkeypatch.setenv("DPO_BACKEND", "local")
    return tmp_path
