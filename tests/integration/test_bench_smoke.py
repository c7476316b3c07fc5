"""The benchmarks' smoke modes: seconds on local/tiny, so the scripts cannot rot. Each test reads the numbers
the script prints and checks they are consistent (no speed target is asserted: smoke runs are too short)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

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


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the output:\n{text[-2000:]}"
    return float(match.group(1))


@pytest.mark.minutes(2.5)
def test_dpo_throughput_benchmark_smoke():
    out = _smoke("dpo_throughput")
    suite_tok_s = _number(r"dpo-suite \(local server, tinker SDK\): ([\d.]+) tok/s", out)
    trl_tok_s = _number(r"TRL DPOTrainer \(peft LoRA\): ([\d.]+) tok/s", out)
    suite_tokens = _number(r"dpo-suite \(local server, tinker SDK\): .*?, (\d+) tokens", out)
    trl_tokens = _number(r"TRL DPOTrainer \(peft LoRA\): .*?, (\d+) tokens", out)
    ratio = _number(r"ratio dpo-suite/TRL tokens/s: ([\d.]+)x", out)
    memory_ratio = _number(r"peak memory ratio ([\d.]+)x", out)
    assert suite_tok_s > 0 and trl_tok_s > 0 and suite_tokens > 0 and trl_tokens > 0 and memory_ratio > 0
    # One round in smoke mode: the ratio is the two printed throughputs' (each rounded to a whole tok/s).
    assert ratio == pytest.approx(suite_tok_s / trl_tok_s, rel=0.05, abs=0.01)


@pytest.mark.minutes(1.5)
def test_reference_cache_benchmark_smoke():
    out = _smoke("reference_cache")
    # The counts are exact even in smoke mode: dpo-suite computes the reference once for three betas.
    suite = int(out.split("dpo-suite (reference cached): ")[1].split(" ")[0])
    cookbook = int(out.split("train_dpo.main x3: ")[1].split(" ")[0])
    assert suite > 0 and cookbook == 3 * suite


@pytest.mark.minutes(5.5)
def test_suite_overhead_benchmark_smoke():
    out = _smoke("suite_overhead")
    direct_s = _number(r"direct library calls: ([\d.]+) s", out)
    cold_s = _number(r"dpo-suite flow, cold: ([\d.]+) s", out)
    rerun_s = _number(r"cached rerun \(in process\): ([\d.]+) s", out)
    cli_s = _number(r"python flows/suite.py, cached rerun .*?: ([\d.]+) s", out)
    assert direct_s > 0 and cold_s > 0 and cli_s > 0
    # The cached rerun trains and samples nothing: it is all cache hits, well under the cold run.
    assert rerun_s < cold_s


@pytest.mark.minutes(1.5)
def test_suite_eval_benchmark_smoke():
    out = _smoke("suite_eval")
    tokens = _number(r"= (\d+) tokens, ", out)
    sampling_s = _number(r"sampling \(all in flight, stop=\[\]\): ([\d.]+) s", out)
    suite_s = _number(r"suite evaluation \(4 threads\): ([\d.]+) s", out)
    generated = _number(r"; (\d+) tokens generated", out)
    ratio = _number(r"ratio suite evaluation / sampling wall: ([\d.]+)x", out)
    # Smoke: 2 models x 3 prompts x k=2 x 4 tokens; the evaluation samples no more than the nominal tokens.
    assert tokens == 2 * 3 * 2 * 4 and 0 < generated <= tokens
    assert sampling_s > 0 and suite_s > 0
    assert ratio == pytest.approx(suite_s / sampling_s, rel=0.1, abs=0.05)
    # The profile names where the evaluation's time went, and the server batched the sampling requests.
    assert "sampling:" in out and "embedding:" in out and "server batches:" in out


@pytest.mark.minutes(2)
def test_gpu_scale_benchmark_smoke():
    """bench/gpu_scale.py's sections on tiny Qwen3 shapes on the CPU: both DPO arms and the sampler run and
    print their figures (the CUDA run needs a device; this keeps the script from rotting meanwhile)."""
    out = _smoke("gpu_scale").replace(",", "")  # thousands separators
    suite_tok_s = _number(r"  dpo-suite: ([\d.]+) tok/s", out)
    trl_tok_s = _number(r"  trl: ([\d.]+) tok/s", out)
    ratio = _number(r"ratio dpo-suite/TRL: ([\d.]+)x tokens/s", out)
    sampled = _number(r"sampling smoke: 8 rows .*?: ([\d.]+) tok/s", out)
    assert suite_tok_s > 0 and trl_tok_s > 0 and sampled > 0
    assert ratio == pytest.approx(suite_tok_s / trl_tok_s, rel=0.05, abs=0.02)
    assert "MFU" in out and "of the HBM bound" in out and "peak RSS" in out


def test_omp_wait_benchmark_smoke():
    out = _smoke("omp_wait")
    default = _number(r"median: default ([\d.]+) s", out)
    passive = _number(r"PASSIVE ([\d.]+) s, ratio", out)
    ratio = _number(r"ratio PASSIVE/default ([\d.]+)x", out)
    assert default > 0 and passive > 0
    # The printed ratio is the two medians' (each printed to 0.5 ms, so their quotient is known to that much).
    slack = (passive + 0.0005) / max(default - 0.0005, 1e-9) - passive / default
    assert abs(ratio - passive / default) <= 0.0005 + slack
