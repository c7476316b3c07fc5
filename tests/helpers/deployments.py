"""The environment the e2e tests run `deployments/dpo.sh` in, all of it under the test's tmp folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.helpers.shipped import shipped_slice


def dpo_sh_env(tmp_path: Path, cache_dir: Path, port: int) -> dict[str, str]:
    """A Prefect server on `port` with its own home, run folders, server storage and results in `tmp_path`."""
    env = {
        **os.environ, "DPO_PREFECT_PORT": str(port), "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "DPO_PYTHON": sys.executable, "DPO_EXPERIMENTS_DIR": str(tmp_path / "experiments"),
        "DPO_LOCAL_STORAGE": str(tmp_path / "storage"), "DPO_DATA_DIR": str(shipped_slice(tmp_path / "data")),
        "DPO_CACHE_DIR": str(cache_dir), "DPO_BACKEND": "local",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
    }
    env.pop("PREFECT_API_URL", None)
    return env
