"""Where a suite's experiments train: subflows in this process, several at once, or deployment runs that any
worker of the Prefect work pool picks up (`dispatch=pool`), on any machine."""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prefect.states import Failed, State

from dpo_core.config import TrainConfig

# The deployment of flows/train.py:dpo_train declared in prefect.yaml.
TRAIN_DEPLOYMENT = os.environ.get("DPO_TRAIN_DEPLOYMENT", "dpo-train/default")


def train_all(experiments: list[tuple[TrainConfig, str]], dispatch: str, max_parallel: int) -> list[State]:
    """Train each (config, run name) as a `dpo-train` subflow here (dispatch="local") or as a run of the
    deployment (dispatch="pool"), `max_parallel` at once; the final states, in order. Never raises for one
    experiment: its state says why it failed."""
    from flows.train import dpo_train

    if dispatch == "pool":
        calls = [functools.partial(train_on_pool, config, name) for config, name in experiments]
    else:
        calls = [functools.partial(dpo_train.with_options(flow_run_name=name), config, return_state=True)
                 for config, name in experiments]
    return in_parallel(calls, max_parallel)


def in_parallel(calls: list[Callable[[], State]], max_parallel: int) -> list[State]:
    """Run each call (a subflow or a deployment run, returning its final state) with at most `max_parallel`
    at once; states come back in the order of `calls`.

    Each call runs in a copy of the caller's context, so Prefect sees the suite's flow run as the parent (the
    experiment gets its own page under the suite in the UI), as its own ThreadPoolTaskRunner does for tasks.
    """
    if max_parallel <= 1 or len(calls) <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="dpo-experiment") as pool:
        futures = [pool.submit(contextvars.copy_context().run, call) for call in calls]
        return [future.result() for future in futures]


def train_on_pool(config: TrainConfig, name: str) -> State:
    """Run one experiment as a run of the `dpo-train` deployment and wait for it: a worker of the deployment's
    pool trains it, on whichever machine the worker runs. Its result (the TrainOutcome) comes back through
    Prefect's result storage, so that storage, the experiments folder and the reference cache must be shared
    by the machines (README, "Scale out")."""
    from prefect.deployments import run_deployment

    try:
        flow_run = run_deployment(TRAIN_DEPLOYMENT, parameters={"config": config.model_dump(mode="json")},
                                  flow_run_name=name, timeout=None)
    except Exception as exc:  # no server, no such deployment: this experiment fails, the others go on
        return Failed(message=f"dispatch=pool could not run deployment {TRAIN_DEPLOYMENT!r}: "
                              f"{type(exc).__name__}: {exc}")
    return flow_run.state


def failure_message(state: State) -> str:
    """Why an experiment did not complete: its exception when the state carries one, else the state's message."""
    try:
        error: Any = state.result(raise_on_failure=False)
    except Exception:  # a remote run whose failure left no stored result: its message says why
        error = None
    if isinstance(error, BaseException):
        return str(error) or type(error).__name__
    return state.message or state.name
