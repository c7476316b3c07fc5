"""The task runner of the suite's flows, chosen by setting: threads (default), Dask or Ray (optional extras)."""

from __future__ import annotations

import os
from typing import Any


def task_runner_from_env() -> Any:
    """DPO_TASK_RUNNER = threads | dask | ray; DPO_TASK_RUNNER_ADDRESS: an existing scheduler/cluster to join;
    DPO_TASK_RUNNER_WORKERS: threads (default 4), or the processes of a new Dask LocalCluster (default 2).

    Dask (`pip install 'dpo-suite[dask]'`): without an address, each flow run starts a `distributed.LocalCluster`
    of worker processes and stops it at the end; with `tcp://host:8786`, tasks go to that scheduler's workers,
    which need this project installed and the same DPO_* settings and shared folders (README, "Scale out").
    """
    kind = os.environ.get("DPO_TASK_RUNNER", "threads").lower()
    address = os.environ.get("DPO_TASK_RUNNER_ADDRESS") or None
    workers = os.environ.get("DPO_TASK_RUNNER_WORKERS")
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=int(workers or 4))
    if kind in ("dask", "ray"):
        try:
            if kind == "dask":
                from prefect_dask import DaskTaskRunner

                if address:
                    return DaskTaskRunner(address=address)
                # One thread per worker process: torch and the tokenizers already use the cores they get.
                return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                                      cluster_kwargs={"n_workers": int(workers or 2), "threads_per_worker": 1})
            from prefect_ray import RayTaskRunner

            return RayTaskRunner(address=address) if address else RayTaskRunner()
        except ImportError:
            raise ImportError(f"DPO_TASK_RUNNER={kind} needs the optional extra: pip install 'dpo-suite[{kind}]'") from None
    raise ValueError(f"DPO_TASK_RUNNER must be threads, dask or ray, got {kind!r}")
