"""`python flows/evaluate.py experiments/RUN [experiments/RUN ...] [num_samples=8 max_prompts=... out=reports/NAME]`.

The Prefect flow `dpo-evaluate`: sample and score each experiment's final checkpoint and its base model on the
eval prompts, then write the comparison report. The suite runs the same tasks as its last stage. `--help` lists
every key (dpo_core/config_docs.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
if __name__ == "__main__":  # answered before Prefect is imported
    from flows.cli import answer_help

    answer_help("evaluate", sys.argv[1:])

from flows.bootstrap import with_shared_backend  # noqa: E402  (before Prefect is imported)

from prefect import flow  # noqa: E402

from dpo_core.config import EvalConfig  # noqa: E402
from dpo_core.settings import install_signal_handlers  # noqa: E402
from flows.artifacts import publish_report  # noqa: E402
from flows.cli import exit_code, parse_config, print_error, quiet_user_tracebacks, take_debug_flag  # noqa: E402
from tasks.caching import file_exists, results_fresh_if_gone, run_fresh_if_gone, still_there  # noqa: E402
from tasks.evaluate import evaluate_model, plan_evaluation  # noqa: E402
from tasks.report import write_report  # noqa: E402


def evaluate_and_report(run_dirs: list[str], eval_config: EvalConfig, out_dir: str,
                        notes: list[str] | None = None) -> str:
    """Evaluate base models and experiments (tasks run concurrently), then the report (`notes`, e.g. the
    suite's model replacements, under its title); returns report.md."""
    # --- evaluate: each base model once, each experiment's final checkpoint (submitted together) ---
    requests = plan_evaluation(run_dirs, eval_config.diversity_instruction)
    eval_dirs = results_fresh_if_gone(evaluate_model, still_there("eval_dir", "summary.json"),
                                      [{"request": r, "eval_config": eval_config} for r in requests])
    # --- report: tables and plots, also as a Prefect artifact ---
    report_path = run_fresh_if_gone(write_report, file_exists, requests, eval_dirs, out_dir, notes or [])
    publish_report(report_path)
    return report_path


@flow(name="dpo-evaluate", log_prints=True)
@with_shared_backend
def dpo_evaluate(run_dirs: list[str], eval_config: EvalConfig = EvalConfig(), out_dir: str = "reports/latest") -> str:
    report_path = evaluate_and_report(run_dirs, eval_config, out_dir)
    print(f"Report: {report_path}")
    return report_path


def main(argv: list[str]) -> int:
    install_signal_handlers()
    argv = take_debug_flag(argv)
    run_dirs = [a for a in argv if "=" not in a]
    config = parse_config(EvalConfig, [a for a in argv if "=" in a and not a.startswith("out=")])
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("out=")), "reports/latest")
    if config is None:
        return 1
    if not run_dirs:
        print_error("name at least one experiment folder (experiments/...); --help lists the keys")
        return 1
    not_runs = [d for d in run_dirs if not (Path(d) / "config.json").is_file()]
    if not_runs:
        print_error(f"not an experiment folder (no config.json): {', '.join(not_runs)}")
        return 1
    quiet_user_tracebacks()
    return exit_code(dpo_evaluate(run_dirs, config, out, return_state=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
