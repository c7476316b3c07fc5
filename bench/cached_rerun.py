"""A cached rerun from the command line: `python flows/suite.py ...` a second time, nothing changed (issue 16).

    python bench/cached_rerun.py                    # this tree vs `main`, 3 rounds, the small local/tiny suite
    python bench/cached_rerun.py --before HEAD~3 --rounds 5
    python bench/cached_rerun.py --smoke            # 1 round, this tree against itself: keeps the script alive

Each arm is a copy of its code (`--before`: `git archive` of that commit; after: this working tree) with its own
Prefect home, experiments, checkpoints and reference cache (converted models and tokenizers are shared). Each
arm runs the suite once cold (untimed), then the rounds alternate the arms, in swapped order every other round
(ABBA), each a new `python flows/suite.py` process, as a user runs it. From the run's own log: the time before
the flow run begins (interpreter, imports, Prefect's temporary server), the flow (every task a cache hit; the
script fails otherwise), and the exit (the servers' shutdown). Medians per arm; the machine's load beside them.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpo_core.settings import default_cache_dir  # noqa: E402

SUITE = ["datasets=1", "models=local/tiny", "eval_max_prompts=4", "eval_num_samples=2", "eval_max_tokens=8"]
LOG_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| \w+ +\| Flow run '([^']+)' - (.*)$")


def checkout(ref: str | None, into: Path) -> Path:
    """The code of `ref` (git archive), or of this working tree with its uncommitted changes (ref None)."""
    into.mkdir(parents=True)
    if ref is None:
        files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (into / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, into / name)
    else:
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(into, filter="data")
    return into


def environment(tree: Path) -> dict[str, str]:
    """A fresh Prefect home and dpo-suite folders inside the arm's tree; nothing inherited that points elsewhere."""
    cache = tree / ".bench-cache"
    cache.mkdir()
    for shared in ("models", "tokenizers"):
        if (default_cache_dir() / shared).exists():
            (cache / shared).symlink_to(default_cache_dir() / shared)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DPO_")) and k != "PYTHONPATH"}
    return {**env, "PREFECT_HOME": str(tree / ".prefect"), "DPO_CACHE_DIR": str(cache),
            "DPO_LOCAL_STORAGE": str(tree / ".dpo_local"), "DPO_EXPERIMENTS_DIR": str(tree / "experiments")}


def run_suite(tree: Path, env: dict[str, str], argv: list[str]) -> dict[str, float]:
    """One `python flows/suite.py` process: wall, and its phases read from the log's timestamps."""
    started_wall = datetime.now()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "flows/suite.py", *argv], cwd=tree, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    # CPU seconds of the process and every child it waited for (Prefect's server included): on a loaded machine
    # the wall measures the neighbours as much as the run, this measures the run's own work.
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"{tree.name}: flows/suite.py failed\n{log[-3000:]}")
    stamps, suite_run = {}, None
    for line in log.splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        clock, run_name, message = match.groups()
        if message.startswith("Beginning flow run") and message.endswith("for flow 'dpo-suite'"):
            suite_run, event = run_name, "begin"
        elif run_name == suite_run and message.startswith("Finished in state"):
            event = "end"
        else:
            continue
        stamp = datetime.combine(started_wall.date(), datetime.strptime(clock, "%H:%M:%S.%f").time())
        stamps[event] = (stamp - started_wall).total_seconds()
    computed = [line for line in log.splitlines() if "Task run" in line and "Finished in state Completed()" in line]
    return {"wall": wall, "cpu": cpu, "before_flow": stamps["begin"], "flow": stamps["end"] - stamps["begin"],
            "exit": wall - stamps["end"], "computed": len(computed),
            "cached": log.count("Cached(type=COMPLETED)")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="main", help="the commit to compare with (default: main)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="1 round, this tree against itself")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dpo-bench-rerun-"))
    try:
        arms = {"before": checkout(None if args.smoke else args.before, work / "before"),
                "after": checkout(None, work / "after")}
        envs = {name: environment(tree) for name, tree in arms.items()}
        for name, tree in arms.items():  # cold: trains, evaluates, reports; creates the Prefect database
            run_suite(tree, envs[name], SUITE)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
        for round_ in range(1 if args.smoke else args.rounds):
            order = list(arms) if round_ % 2 == 0 else list(arms)[::-1]
            for name in order:
                run = run_suite(arms[name], envs[name], SUITE)
                if run["computed"]:
                    raise SystemExit(f"{name}: {run['computed']} task runs computed on a rerun; expected all cached")
                run["load"] = os.getloadavg()[0]
                runs[name].append(run)
        label = {"before": f"before ({'this tree' if args.smoke else args.before})", "after": "after (this tree)"}
        print(f"python flows/suite.py {' '.join(SUITE)}: cached rerun, {len(runs['after'])} round(s), arms "
              f"alternating (ABBA)")
        for name, measured in runs.items():
            median = {key: statistics.median(r[key] for r in measured)
                      for key in ("wall", "cpu", "before_flow", "flow", "exit")}
            print(f"  {label[name]}: {median['wall']:.1f} s median (runs {[round(r['wall'], 1) for r in measured]}); "
                  f"before the flow run {median['before_flow']:.1f} s, flow {median['flow']:.1f} s, exit "
                  f"{median['exit']:.1f} s; CPU {median['cpu']:.1f} s; {measured[0]['cached']} cached task runs; load "
                  f"{[round(r['load'], 1) for r in measured]}")
        for key in ("wall", "cpu"):
            ratios = [a[key] / b[key] for a, b in zip(runs["after"], runs["before"])]
            print(f"  ratio after/before, {key}: {statistics.median(ratios):.2f}x (per round "
                  f"{[round(r, 2) for r in ratios]})")
        print("  target: a cached rerun < 15 s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
