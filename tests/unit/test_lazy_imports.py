"""A fully cached rerun must not pay for torch, transformers, tinker or the cookbook (issue 16: ~12 s of imports
before Prefect even started). Checked in a fresh interpreter: importing every flow and computing the cache keys
that a cached rerun computes leaves those libraries unimported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "tinker", "tinker_cookbook")

PROBE = """
import json, sys
import flows.suite, flows.train, flows.evaluate, flows.pairs
from dpo_core.plan import SuiteConfig
from dpo_core.settings import Settings
from tasks.caching import compute_identity, content_key
from tasks.policy import where
where()  # the backend/device/dtype part of every model task's key (device "auto" asked torch before)
content_key(extra=where)(None, {"config": SuiteConfig()})
print(json.dumps({name: name in sys.modules for name in %r}))
"""


def _imported_after(code: str, **env: str) -> dict[str, bool]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "DPO_LOCAL_DEVICE": "auto",
                               "HOME": str(Path.home()), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_flows_and_cache_keys_import_no_model_library():
    imported = _imported_after(PROBE % (HEAVY,))
    assert not any(imported.values()), f"imported on the cached path: {[k for k, v in imported.items() if v]}"


def test_the_probe_sees_an_import_when_there_is_one():
    # The same probe, after an import that does pull torch in: the check is not vacuous.
    imported = _imported_after(PROBE.replace("print(", "import dpo_core.sampling\nprint(", 1) % (HEAVY,))
    assert imported["tinker"] and imported["torch"]


# What `python flows/suite.py` does around its imports: Prefect's temporary server starts first, and this process
# never imports Prefect's server package (FastAPI, SQLAlchemy, every route: seconds) just to launch it.
RUN_PROBE = """
import json, sys
from flows import prefect_server
prefect_server.start_early()
import flows.suite
from prefect import flow
from tasks.setup import on_prefect_server
prefect_server.connect()

@flow
def probe():
    return 1

state = probe(return_state=True)
print(json.dumps({"completed": state.is_completed(), "reported_as_prefect_server": on_prefect_server(),
                  **{name: name in sys.modules for name in %r}}))
"""


@pytest.mark.slow  # starts Prefect's server
def test_a_cli_run_starts_prefects_server_early_without_importing_it(tmp_path):
    imported = _imported_after(RUN_PROBE % (("prefect.server.api.server", *HEAVY),),
                               PREFECT_HOME=str(tmp_path / "prefect"))
    assert imported.pop("completed")
    assert not imported.pop("reported_as_prefect_server")  # no tag limits on a temporary server (tasks/setup.py)
    assert not any(imported.values()), f"imported by a CLI run: {[k for k, v in imported.items() if v]}"
