"""OpenMP's wait policy on a shared CPU: a SmolLM2 forward workload with torch's default (threads spin while
they wait) vs OMP_WAIT_POLICY=PASSIVE (they sleep), arms alternating over rounds, each in a fresh process (the
variable is read when torch's OpenMP runtime starts, so it cannot change inside one process).

    .venv/bin/python bench/omp_wait.py [--rounds 3] [--threads 2] [--smoke]

Prints each round's seconds per arm and the median ratio passive/default (below 1 = PASSIVE is faster). The
entry points and `python -m dpo_core.local serve` set PASSIVE unless the variable is already set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKLOAD = r"""
import json, sys, time
import torch
from pathlib import Path
from dpo_core import models
from dpo_core.local import store
from dpo_core.settings import Settings
name, threads, rows, prompt_len, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
model = store.load_model(name, cache_dir=Path(Settings().cache_dir))
ids = torch.randint(0, 1000, (rows, prompt_len), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):  # decode steps: many small ops, where spinning vs sleeping threads matters most
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def run_arm(passive: bool, args: argparse.Namespace) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", WORKLOAD, args.model, str(args.threads), str(args.rows),
                          str(args.prompt_len), str(args.steps)], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="local/tiny, 1 round, a few steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.rounds, args.rows, args.prompt_len, args.steps = "local/tiny", 1, 4, 8, 2
    load = os.getloadavg()[0]
    rows = []
    for round_index in range(args.rounds):
        order = (False, True) if round_index % 2 == 0 else (True, False)
        times = {passive: run_arm(passive, args) for passive in order}
        rows.append((times[False], times[True]))
        print(f"round {round_index + 1}: default {times[False]:.2f} s, PASSIVE {times[True]:.2f} s", flush=True)
    default = statistics.median(r[0] for r in rows)
    passive = statistics.median(r[1] for r in rows)
    print(f"{args.model}, {args.threads} threads, {args.rows} rows x {args.prompt_len} prompt tokens + "
          f"{args.steps} decode steps, load average at start {load:.1f}")
    print(f"median: default {default:.3f} s, PASSIVE {passive:.3f} s, ratio PASSIVE/default {passive / default:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
