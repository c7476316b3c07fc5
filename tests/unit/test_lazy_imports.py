"""A fully cached rerun must not pay for torch, transformers, tinker or the cookbook (issue 16: ~12 s of imports
before Prefect even started). Checked in a fresh interpreter: importing every flow and computing the cache keys
that a cached rerun computes leaves those libraries unimported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def _imported_after(code: str) -> dict[str, bool]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "DPO_LOCAL_DEVICE": "auto",
                               "HOME": str(Path.home())})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_flows_and_cache_keys_import_no_model_library():
    imported = _imported_after(PROBE % (HEAVY,))
    assert not any(imported.values()), f"imported on the cached path: {[k for k, v in imported.items() if v]}"


def test_the_probe_sees_an_import_when_there_is_one():
    # The same probe, after an import that does pull torch in: the check is not vacuous.
    imported = _imported_after(PROBE.replace("print(", "import dpo_core.sampling\nprint(", 1) % (HEAVY,))
    assert imported["tinker"] and imported["torch"]
