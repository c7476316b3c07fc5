"""Shared fixtures. Everything runs offline: HF hub off, tinker telemetry off, W&B off."""

from __future__ import annotations

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false", "TINKER_TELEMETRY": "0", "WANDB_MODE": "disabled",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ[_key] = _value
os.environ.pop("TINKER_API_KEY", None)  # tests never talk to the cloud

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from dpo_core.settings import Settings  # noqa: E402

TINY = "local/tiny"


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The real model cache (converted SmolLM2 weights, tokenizers): built once per machine, shared."""
    return Settings().cache_dir


@pytest.fixture(scope="session")
def shipped_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 80 pairs of each shipped dataset and the prompt files (tests/helpers/shipped.py says why)."""
    from tests.helpers.shipped import shipped_slice

    return shipped_slice(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def registered(cache_dir: Path) -> Path:
    from dpo_core import rendering

    rendering.register_models(cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, registered: Path):
    """One local Tinker server over loopback for the session, with its own storage."""
    from dpo_core.local.launcher import local_server

    storage = tmp_path_factory.mktemp("local-storage")
    # No cap on live training models: the session's one client (below) keeps every test's models until the end,
    # which the default cap of 16 (DPO_LOCAL_MAX_TRAINING_MODELS, tested in tests/reliability) would refuse.
    settings = Settings(cache_dir=registered, local_storage=storage, local_max_training_models=0)
    with local_server(settings) as running:
        yield running


@pytest.fixture(scope="session")
def service_client(server):
    import tinker

    with tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key) as client:
        yield client  # closed before the server stops: no session heartbeat left failing at exit


# Everything that starts a server, a model or Prefect takes more than ~5 s: those folders are the slow lane.
# `make test-fast` (pytest -m "not slow") runs the rest in well under a minute.
SLOW_FOLDERS = ("integration", "flows", "e2e", "reliability", "tinker_path")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(part in SLOW_FOLDERS for part in Path(str(item.fspath)).parts[-3:-1]):
            item.add_marker(pytest.mark.slow)
    # The multi-minute tests first, longest first; the rest keep their order (the sort is stable). `make test`'s
    # xdist workers take tests in this order as they free up, so a multi-minute test collected last would keep
    # one worker busy long after the others ran out of work.
    items.sort(key=lambda item: -_minutes(item))


def _minutes(item: pytest.Item) -> float:
    marker = item.get_closest_marker("minutes")
    return 0.0 if marker is None else float(marker.args[0])
