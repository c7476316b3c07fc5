"""`python flows/suite.py [datasets=1,2 models=... dpo_beta=0.05,0.1,0.2 ...]`: the whole study as the flow `dpo-suite`.

For every dataset x model (x hyperparameter value): validate each dataset once (a hard gate), train (one
`dpo-train` subflow per experiment, each its own page in the UI), register the checkpoints, evaluate output
diversity against the base models, and write the comparison report. Without TINKER_API_KEY it runs on the
local server with the shipped datasets and SmolLM2-135M-Instruct. `--help` lists every key and its default per
backend (dpo_core/config_docs.py), e.g.

    .venv/bin/python flows/suite.py preset=quick
    .venv/bin/python flows/suite.py datasets=1,2 dpo_beta=0.05,0.1 batch_size=8
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from flows import prefect_server  # noqa: E402  (standard library only)

if __name__ == "__main__":
    from flows.cli import answer_help

    answer_help("suite", sys.argv[1:])  # before anything starts
    prefect_server.start_early()  # Prefect's temporary server starts up while this process imports the rest

from flows.bootstrap import with_shared_backend  # noqa: E402  (before Prefect is imported)

from prefect import flow, get_run_logger  # noqa: E402
from prefect.states import Completed, Failed  # noqa: E402

from dpo_core.data import DatasetNotFoundError  # noqa: E402
from dpo_core.plan import SuiteConfig, check_runnable, dry_run_plan, max_parallel_for, split_lists, step_count_problems  # noqa: E402
from dpo_core.settings import Settings, install_signal_handlers  # noqa: E402
from flows.artifacts import publish_checkpoints, publish_validation  # noqa: E402
from flows.cli import parse_config, preflight, print_error, quiet_user_tracebacks, take_debug_flag  # noqa: E402
from flows.dispatch import failure_message, train_all  # noqa: E402
from flows.evaluate import evaluate_and_report  # noqa: E402
from tasks.plan import list_served_models, plan_experiments  # noqa: E402
from tasks.runners import task_runner_from_env  # noqa: E402
from tasks.setup import ensure_concurrency_limits, training_slots  # noqa: E402
from tasks.validate import validate_dataset  # noqa: E402


@flow(name="dpo-suite", log_prints=True, task_runner=task_runner_from_env())
@with_shared_backend
def dpo_suite(config: SuiteConfig = SuiteConfig()):
    logger = get_run_logger()
    ensure_concurrency_limits()
    # --- plan: ask the service what it serves; retired seed models move to their successors (announced) ---
    suite = plan_experiments(config, list_served_models())
    for note in suite.lineup.notes:
        logger.info("%s", note)
    for warning in suite.lineup.skipped:
        logger.warning("%s", warning)
    failures: dict[str, str] = {}

    # --- validate: each dataset once, all at once on the task runner (threads, or Dask workers); a missing one
    # is skipped, a bad one gates its experiments (the planned experiments may add one: the positive control's) ---
    validated = {}
    datasets = dict.fromkeys([*config.datasets, *(e.dataset for e in suite.experiments)])
    futures = {dataset: validate_dataset.submit(dataset) for dataset in datasets}
    for dataset, future in futures.items():
        outcome = future.result(raise_on_failure=False)
        if future.state.is_completed():
            validated[dataset] = outcome
            publish_validation(dataset, outcome.report_markdown)
        elif isinstance(outcome, DatasetNotFoundError):
            logger.warning("Skipping dataset %s: %s", dataset, outcome)
        else:
            failures[f"dataset {dataset}"] = str(outcome)

    # --- refuse a plan too short to move the weights (fewer than MIN_STEPS optimizer steps), before training ---
    too_few = step_count_problems(suite.experiments, validated)
    if too_few:
        problems = [*too_few, *(f"{k}: {v}" for k, v in failures.items())]  # the invalid datasets too
        return Failed(message="; ".join(problems), data={"experiments": [], "report": None, "failed": problems})

    # --- train: one dpo-train subflow per experiment, up to max_parallel at once; a failure stays its own ---
    runnable = [(c, n) for c, n in zip(suite.experiments, suite.run_names) if c.dataset in validated]
    slots = training_slots(max_parallel_for(config, Settings().resolved_backend()))
    states = train_all(runnable, config.dispatch, slots)
    finished = []
    for (_, name), state in zip(runnable, states):
        if state.is_completed():
            finished.append(state.result())
        else:
            failures[name] = failure_message(state)

    # --- register: where the weights are ---
    if finished:
        publish_checkpoints(finished)

    # --- evaluate and report: diversity by creativity, every experiment vs its base model ---
    report_path = None
    if config.evaluate and finished:
        try:
            report_path = evaluate_and_report([o.run_dir for o in finished], suite.eval_config, config.report_dir,
                                              notes=suite.lineup.notes + suite.lineup.skipped)
            print(f"Report: {report_path}")
        except Exception as exc:  # the trained runs stay registered; the suite reports what failed
            failures["evaluation"] = f"{type(exc).__name__}: {exc}"

    summary = {"experiments": [o.run_dir for o in finished], "report": report_path, "failed": failures}
    if not finished and not failures:
        return Failed(message="nothing ran: " + ("; ".join(suite.lineup.skipped) or "no dataset found"),
                      data=summary)
    if failures:
        return Failed(message="; ".join(f"{k}: {v}" for k, v in failures.items()), data=summary)
    return Completed(message=f"{len(finished)} experiments; report {report_path}", data=summary)


def main(argv: list[str]) -> int:
    install_signal_handlers()
    config = parse_config(SuiteConfig, take_debug_flag(argv), prepare=split_lists)
    if config is None or not preflight(lambda: check_runnable(config, Settings())):
        return 1
    if config.dry_run:  # the plan, before any client exists (retired models are not looked up)
        return 0 if preflight(lambda: print(dry_run_plan(config, Settings()))) else 1
    quiet_user_tracebacks()
    prefect_server.connect()
    state = dpo_suite(config, return_state=True)
    if state.is_completed():
        print(state.message or state.name)
        return 0
    print_error(state.message or state.name)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
