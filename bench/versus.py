"""One benchmark against two checkouts of dpo-suite, alternating in one run: the ratio of their medians.

    git worktree add /tmp/engine-base main                       # the previous commit, beside this tree
    python bench/versus.py --base /tmp/engine-base --rounds 3 --metric batched_tok_s -- bench/sampling.py --batched-only
    python bench/versus.py --base /tmp/engine-base --rounds 2 --metric suite_s --lower -- bench/suite_eval.py --suite-only

Each arm runs this tree's copy of the benchmark script in its own process with `DPO_BENCH_TREE` naming the
checkout whose code it imports (its working directory is that checkout, so its data and defaults apply). Arms
alternate ABBA over the rounds, because the machine is shared and noisy; the load average is recorded beside
each run. The script must accept `--json PATH` and write its result there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_arm(tree: Path, script: list[str], timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="dpo-versus-") as folder:
        out = Path(folder) / "result.json"
        env = {**os.environ, "DPO_BENCH_TREE": str(tree)}
        started = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / script[0]), *script[1:], "--json", str(out)], cwd=tree, env=env,
                       check=True, timeout=timeout_s)
        result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, type=Path, help="the other checkout (e.g. a worktree of main)")
    parser.add_argument("--this", type=Path, default=ROOT, help="the checkout measured against it (default: this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--metric", required=True, help="the key of the script's JSON result to compare")
    parser.add_argument("--lower", action="store_true", help="lower is better (seconds); default: higher (tok/s)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per arm")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- bench/SCRIPT.py [its arguments]")
    args = parser.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    arms = {"base": args.base.resolve(), "this": args.this.resolve()}
    runs: dict[str, list[float]] = {"base": [], "this": []}
    loads: dict[str, list[float]] = {"base": [], "this": []}
    for round_index in range(args.rounds):
        order = ["base", "this"] if round_index % 2 == 0 else ["this", "base"]
        for name in order:
            load = os.getloadavg()[0]
            result = run_arm(arms[name], script, args.timeout)
            runs[name].append(float(result[args.metric]))
            loads[name].append(round(load, 1))
            print(f"round {round_index + 1} {name}: {args.metric} = {result[args.metric]:.2f} "
                  f"(load {load:.1f}, {result['wall_s']:.0f} s)", flush=True)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratio = medians["base"] / medians["this"] if args.lower else medians["this"] / medians["base"]
    per_round = [(b / t if args.lower else t / b) for b, t in zip(runs["base"], runs["this"])]
    print(f"{' '.join(script)}: {args.rounds} round(s), arms alternating (ABBA)")
    for name in ("base", "this"):
        print(f"  {name} ({arms[name]}): {args.metric} median {medians[name]:.2f} (runs "
              f"{[round(v, 2) for v in runs[name]]}; load {loads[name]})")
    print(f"  speed-up this/base: {ratio:.2f}x (per round {[round(r, 2) for r in per_round]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
