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
