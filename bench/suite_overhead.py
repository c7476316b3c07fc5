"""What orchestration costs: the `dpo-suite` flow vs the same library functions called directly, and a rerun.

    python bench/suite_overhead.py              # local/tiny, datasets 1-3, batch 8 (10 steps each), 8 eval prompts
    python bench/suite_overhead.py --smoke      # 4 pairs of dataset 1, 2 eval prompts: keeps the script alive

Arms, each in its own fresh workspace (experiments, reference cache, checkpoints, Prefect results), one process,
same model, data, threads and seed:
- direct: dpo_core.experiment's validate_dataset / train_experiment / final_record / evaluate_model (concurrent,
  as the flow submits them) / write_report, in the flow's order;
- flow, cold: the `dpo-suite` flow on a Prefect temporary server that is already up;
- flow, cached rerun: the same flow again (every task a cache hit);
- CLI, cached rerun: `python flows/suite.py ...` in a new process, as a user runs it (interpreter start, imports,
  its own temporary Prefect server, then all cache hits).
Per-task overhead = (flow cold - direct) / task runs, with direct = the mean of a run before and a run after the
cold flow (an untimed direct run first warms imports, the embedder and the tokenizers for every arm). Prefect's
temporary-server start is reported on its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpo_core.settings import apply_offline_env, default_cache_dir  # noqa: E402

apply_offline_env()
WORK = Path(tempfile.mkdtemp(prefix="dpo-bench-suite-"))
os.environ.update({
    "PREFECT_HOME": str(WORK / "prefect-home"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(WORK / "prefect-results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
})
os.environ.pop("PREFECT_API_URL", None)


def workspace(name: str) -> dict[str, str]:
    """Fresh experiments, reference cache and checkpoint storage; converted models and tokenizers are shared."""
    root = WORK / name
    cache = root / "cache"
    cache.mkdir(parents=True)
    for shared in ("models", "tokenizers"):
        source = default_cache_dir() / shared
        if source.exists():
            (cache / shared).symlink_to(source)
    return {"DPO_EXPERIMENTS_DIR": str(root / "experiments"), "DPO_CACHE_DIR": str(cache),
            "DPO_LOCAL_STORAGE": str(root / "storage"), "DPO_DATA_DIR": str(ROOT / "data")}


def direct(config) -> tuple[float, int]:
    """The suite's steps as plain function calls (no Prefect)."""
    from dpo_core import experiment
    from dpo_core.plan import plan
    from dpo_core.settings import Settings

    started = time.perf_counter()
    settings = Settings()
    experiments, eval_config = plan(config, settings.resolved_backend())
    for dataset in config.datasets:
        experiment.validate_dataset(dataset, settings)
    finished = []
    for train_config in experiments:
        dataset = experiment.validate_dataset(train_config.dataset, settings)  # the train subflow validates too
        finished.append(experiment.train_experiment(train_config, settings, dataset).run_dir)
    calls = experiment.plan_evaluation(finished)
    experiment.prepare_concurrent_evaluation()
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        eval_dirs = list(pool.map(lambda request: experiment.evaluate_model(request, eval_config, settings), calls))
    entries = experiment.report_entries(calls, eval_dirs)
    experiment.write_report(entries, str(Path(settings.experiments_dir) / "report"))
    tasks = len(config.datasets) + 3 * len(experiments) + len(calls) + 1
    return time.perf_counter() - started, tasks


def timed_flow(config) -> float:
    from flows.suite import dpo_suite

    started = time.perf_counter()
    state = dpo_suite(config, return_state=True)
    if not state.is_completed():
        raise SystemExit(f"dpo-suite failed: {state.message}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="dataset 1 only, 2 eval prompts x 2 samples")
    parser.add_argument("--model", default="local/tiny")
    args = parser.parse_args()
    from dpo_core.plan import SuiteConfig

    # allow_few_steps: the orchestration around the work is measured here, not learning
    fields = dict(datasets=[1, 2, 3], models=[args.model], batch_size=8, max_length=128, eval_num_samples=4,
                  eval_max_prompts=8, eval_max_tokens=16, allow_few_steps=True)
    if args.smoke:
        import pandas as pd

        from dpo_core import data

        small = WORK / "smoke_pairs.parquet"
        pd.read_parquet(ROOT / "data" / data.DATASET_FILES[1]).head(4).to_parquet(small)
        fields.update(datasets=[str(small)], eval_num_samples=2, eval_max_prompts=2, eval_max_tokens=4, batch_size=4)
    import logging

    logging.disable(logging.WARNING)
    from prefect import flow

    @flow(name="bench-warm-up")
    def warm_up() -> None:
        return None

    started = time.perf_counter()
    warm_up()  # starts Prefect's temporary server for this process
    server_start = time.perf_counter() - started

    for name in (["warm"] if not args.smoke else []) + ["direct"]:
        os.environ.update(workspace(name))
        direct_s, tasks = direct(SuiteConfig(**fields, report_dir=str(WORK / name / "report")))

    env = workspace("flow")
    os.environ.update(env)
    config = SuiteConfig(**fields, report_dir=str(WORK / "flow" / "report"))
    cold_s = timed_flow(config)
    rerun_s = timed_flow(config)
    if not args.smoke:
        os.environ.update(workspace("direct-after"))
        after_s, _ = direct(SuiteConfig(**fields, report_dir=str(WORK / "direct-after" / "report")))
        direct_s = (direct_s + after_s) / 2
    os.environ.update(env)

    argv = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in fields.items()]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "flows" / "suite.py"), *argv,
                           f"report_dir={WORK / 'flow' / 'report'}"], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True)
    cli_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"CLI rerun failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    print(f"model {args.model}: datasets {fields['datasets']}, batch {fields['batch_size']}, "
          f"eval {fields['eval_max_prompts']} prompts x {fields['eval_num_samples']} samples; {tasks} task runs")
    print(f"  Prefect temporary server start (once per process): {server_start:.1f} s")
    print(f"  direct library calls: {direct_s:.1f} s")
    print(f"  dpo-suite flow, cold: {cold_s:.1f} s -> overhead {cold_s - direct_s:+.1f} s "
          f"({(cold_s - direct_s) / tasks:+.2f} s per task run, {cold_s / direct_s:.2f}x direct)")
    print(f"  dpo-suite flow, cached rerun (in process): {rerun_s:.1f} s ({rerun_s / cold_s:.3f}x cold)")
    print(f"  python flows/suite.py, cached rerun (new process, server start included): {cli_s:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        import shutil

        shutil.rmtree(WORK, ignore_errors=True)
