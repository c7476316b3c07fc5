"""The guide's path on a Tinker stand-in: the *tinker* backend (TINKER_API_KEY + TINKER_BASE_URL) against
`python -m dpo_core.local serve --stand-in tinker`, started as its own process exactly as a user would.

Entry points run as subprocesses whose environment is a user's: HF_HUB_OFFLINE is *not* set (the client loads the
Qwen3 tokenizer by repo id), HF_HOME is a primed hub cache, and HF_ENDPOINT a loopback hub that answers the
metadata requests transformers makes even with a complete cache (see tests/helpers/hf_cache.py). Nothing leaves
127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers.hf_cache import loopback_hub, prime_qwen3_8b
from tests.helpers.net import free_port
from tests.helpers.processes import stop_group
from tests.helpers.shipped import shipped_slice

ROOT = Path(__file__).resolve().parents[2]
QWEN3_8B = "Qwen/Qwen3-8B"
# Variables a user's shell would not have: the test session forces offline mode for the local backend.
_NOT_A_USERS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "DPO_BACKEND",
                "PREFECT_API_URL", "TINKER_API_KEY", "TINKER_BASE_URL")


@dataclass(frozen=True)
class StandIn:
    base_url: str
    api_key: str
    storage: Path
    log: Path


@pytest.fixture(scope="session")
def hf_hub(tmp_path_factory):
    """A primed HF home (the real Qwen3 tokenizer under `Qwen/Qwen3-8B`) and the loopback hub answering for it."""
    home = tmp_path_factory.mktemp("hf-home")
    with loopback_hub(prime_qwen3_8b(home)) as hub:
        yield home, hub


@pytest.fixture(scope="session")
def standin(tmp_path_factory, cache_dir):
    """`python -m dpo_core.local serve --stand-in tinker` in its own process group, stopped with SIGTERM."""
    storage = tmp_path_factory.mktemp("standin-storage")
    log = storage.parent / "standin.log"
    port, key = free_port(), "tml-" + secrets.token_hex(16)
    env = {**os.environ, "DPO_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dpo_core.local", "serve", "--stand-in", "tinker", "--port", str(port),
             "--storage", str(storage), "--api-key", key],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base_url}/api/v1/healthz", headers={"X-API-Key": key}, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the stand-in did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield StandIn(base_url, key, storage, log)
    stop_group(process)


@pytest.fixture
def tinker_env(tmp_path, standin, hf_hub, cache_dir) -> dict[str, str]:
    """A user's environment for the tinker backend pointed at the stand-in; run folders and Prefect in tmp."""
    home, hub = hf_hub
    env = {k: v for k, v in os.environ.items() if k not in _NOT_A_USERS}
    env.update({
        "TINKER_API_KEY": standin.api_key, "TINKER_BASE_URL": standin.base_url,
        "HF_HOME": str(home), "HF_ENDPOINT": hub.url,
        "DPO_DATA_DIR": str(shipped_slice(tmp_path / "shipped-data")),
        "DPO_EXPERIMENTS_DIR": str(tmp_path / "experiments"),
        # The client's caches (reference logprobs) per test; the stand-in keeps its own model cache.
        "DPO_CACHE_DIR": str(tmp_path / "client-cache"),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PYTHONPATH": str(ROOT),
    })
    return env


def run_entry(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python <args>` (an entry point of the repo) as the user would, from `cwd`."""
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
