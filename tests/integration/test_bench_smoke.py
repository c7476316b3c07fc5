"""The benchmarks' smoke modes: seconds on local/tiny, so the scripts cannot rot (no timing is asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampling_benchmark_smoke(registered):
    result = _load("sampling").run("local/tiny", prompts=3, k=2, max_tokens=4)
    assert result["tokens"] == 3 * 2 * 4
    assert result["sequential_s"] > 0 and result["batched_s"] > 0 and result["ratio"] > 0


def _smoke(name: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--smoke"], capture_output=True, text=True,
                          cwd=BENCH.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_dpo_throughput_benchmark_smoke():
    out = _smoke("dpo_throughput")
    assert "dpo-suite (local server, tinker SDK):" in out and "TRL DPOTrainer" in out
    assert "ratio dpo-suite/TRL tokens/s:" in out and "peak memory ratio" in out


def test_reference_cache_benchmark_smoke():
    out = _smoke("reference_cache")
    # The counts are exact even in smoke mode: dpo-suite computes the reference once for three betas.
    suite = int(out.split("dpo-suite (reference cached): ")[1].split(" ")[0])
    cookbook = int(out.split("train_dpo.main x3: ")[1].split(" ")[0])
    assert suite > 0 and cookbook == 3 * suite


def test_suite_overhead_benchmark_smoke():
    out = _smoke("suite_overhead")
    assert "direct library calls:" in out and "cached rerun (in process)" in out
    assert "python flows/suite.py, cached rerun" in out
