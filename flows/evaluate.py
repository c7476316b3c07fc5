"""`python flows/evaluate.py experiments/RUN [experiments/RUN ...] [num_samples=8 max_prompts=... out=reports/NAME]`.

The Prefect flow `dpo-evaluate`: sample and score each experiment's final checkpoint and its base model on the
eval prompts, then write the comparison report. The suite runs the same tasks as its last stage.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_core.settings import apply_offline_env, install_signal_handlers  # noqa: E402

apply_offline_env()
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from dpo_core import checkpoints  # noqa: E402
from dpo_core.experiment import prepare_concurrent_evaluation  # noqa: E402
from dpo_core.config import EvalConfig  # noqa: E402
from dpo_core.report import report_artifact_markdown  # noqa: E402
from flows.cli import exit_code, parse_config  # noqa: E402
from tasks.caching import run_fresh_if_gone, still_there  # noqa: E402
from tasks.training import evaluate_model, write_report  # noqa: E402


def evaluate_and_report(run_dirs: list[str], eval_config: EvalConfig, out_dir: str) -> str:
    """Evaluate base models and experiments (tasks run concurrently), then the report; returns report.md."""
    experiments = []
    for run_dir in run_dirs:
        saved = json.loads((Path(run_dir) / "config.json").read_text())
        experiments.append((run_dir, saved["train_config"], saved["dataset_path"], checkpoints.final_record(run_dir)))
    base_models = list(dict.fromkeys(config["model_name"] for _, config, _, _ in experiments))
    datasets = tuple(dict.fromkeys(path for _, _, path, _ in experiments))
    # --- evaluate: each base model once, each experiment's final checkpoint (submitted together) ---
    calls = [(f"{m} (base)", m, None, eval_config, None, datasets) for m in base_models]
    calls += [(Path(run_dir).name, config["model_name"], final["sampler_path"], eval_config, run_dir, (dataset,))
              for run_dir, config, dataset, final in experiments]
    prepare_concurrent_evaluation()
    futures = [evaluate_model.submit(*call) for call in calls]
    evaluated = still_there("eval_dir", "summary.json")
    eval_dirs = []
    for call, future in zip(calls, futures):
        result = future.result()  # a cached evaluation whose folder was deleted since runs again
        eval_dirs.append(result if evaluated(result) else evaluate_model.with_options(refresh_cache=True)(*call))
    entries = [{"label": label, "model_name": model, "eval_dir": eval_dir}
               for (label, model, *_), eval_dir in zip(calls[:len(base_models)], eval_dirs)]
    for (run_dir, config, _, _), eval_dir in zip(experiments, eval_dirs[len(base_models):]):
        entries.append({"label": Path(run_dir).name, "model_name": config["model_name"], "eval_dir": eval_dir,
                        "dataset": str(config["dataset"]), "learning_rate": config["learning_rate"],
                        "dpo_beta": config["dpo_beta"], "run_dir": run_dir})
    # --- report: tables and plots, also as a Prefect artifact ---
    report_path = run_fresh_if_gone(write_report, lambda p: Path(p).exists(), entries, out_dir)
    create_markdown_artifact(key="dpo-diversity-report", markdown=report_artifact_markdown(Path(report_path)),
                             description="Output diversity: datasets x models vs base, by creativity")
    return report_path


@flow(name="dpo-evaluate", log_prints=True)
def dpo_evaluate(run_dirs: list[str], eval_config: EvalConfig = EvalConfig(), out_dir: str = "reports/latest") -> str:
    report_path = evaluate_and_report(run_dirs, eval_config, out_dir)
    print(f"Report: {report_path}")
    return report_path


def main(argv: list[str]) -> int:
    install_signal_handlers()
    run_dirs = [a for a in argv if "=" not in a]
    config = parse_config(EvalConfig, [a for a in argv if "=" in a and not a.startswith("out=")])
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("out=")), "reports/latest")
    if config is None:
        return 1
    if not run_dirs:
        print("error: name at least one experiment folder (experiments/...)", file=sys.stderr)
        return 1
    return exit_code(dpo_evaluate(run_dirs, config, out, return_state=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
