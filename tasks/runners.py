"""The task runner of the suite's flows, chosen by setting: threads (default), Dask or Ray (optional extras)."""

from __future__ import annotations

import os
from typing import Any


def task_runner_from_env() -> Any:
    """DPO_TASK_RUNNER = threads | dask | ray (DPO_TASK_RUNNER_ADDRESS: an existing cluster to join)."""
    kind = os.environ.get("DPO_TASK_RUNNER", "threads").lower()
    address = os.environ.get("DPO_TASK_RUNNER_ADDRESS") or None
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=int(os.environ.get("DPO_TASK_RUNNER_WORKERS", "4")))
    if kind in ("dask", "ray"):
        try:
            if kind == "dask":
                from prefect_dask import DaskTaskRunner

                return DaskTaskRunner(address=address) if address else DaskTaskRunner()
            from prefect_ray import RayTaskRunner

            return RayTaskRunner(address=address) if address else RayTaskRunner()
        except ImportError:
            raise ImportError(f"DPO_TASK_RUNNER={kind} needs the optional extra: pip install 'dpo-suite[{kind}]'") from None
    raise ValueError(f"DPO_TASK_RUNNER must be threads, dask or ray, got {kind!r}")
