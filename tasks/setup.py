"""Project setup the flows rely on, created by the project itself so it is never silently absent."""

from __future__ import annotations

import os

from prefect import get_client

# The API URL of a temporary Prefect server that an entry point started for its own run (flows/prefect_server.py),
# set beside PREFECT_API_URL and inherited by child processes: that is no Prefect server of the user's.
TEMPORARY_API_URL_ENV = "DPO_TEMPORARY_PREFECT_API_URL"

# Tag-based limits: simultaneous training runs and sampling/evaluation tasks against Tinker (or the local server).
CONCURRENCY_LIMITS = {"tinker-train": 4, "tinker-sample": 8}


def on_prefect_server() -> bool:
    """Whether flows report to a Prefect server (PREFECT_API_URL set in the environment or the profile), as
    opposed to the temporary server Prefect (or `flows/prefect_server.py`) starts for a single process."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return bool(url) and url != os.environ.get(TEMPORARY_API_URL_ENV)


def task_tags(*tags: str) -> list[str]:
    """Task tags, on a Prefect server only: "dpo" plus the concurrency tags.

    On the temporary server there are no tag limits to honour (see below), yet Prefect looks up a slot for every
    tagged task, and after an idle second that lookup costs ~2 s (measured: tagged tasks 1.8-2.4 s, untagged
    3-7 ms, Prefect 3.9.1). Untagged, a cached suite rerun drops from 15 s to a few seconds. Decided when the
    tasks module is imported: a deployment's worker has PREFECT_API_URL set before it loads the flow.
    """
    return ["dpo", *tags] if on_prefect_server() else []


def ensure_concurrency_limits(limits: dict[str, int] = CONCURRENCY_LIMITS) -> bool:
    """Create the tag limits on a real Prefect server (PREFECT_API_URL set, e.g. by deployments/dpo.sh).

    Runs on Prefect's temporary server skip them: a process killed while holding a slot kept it there (its
    lease was never reclaimed while we watched, 9+ minutes), which blocked the rerun that should resume it.
    Returns whether the limits are in place.
    """
    if not on_prefect_server():
        return False
    with get_client(sync_client=True) as client:
        for tag, limit in limits.items():
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
    return True


def training_slots(requested: int) -> int:
    """Experiments to start at once: `requested`, bounded on a Prefect server by the `tinker-train` limit (more
    would only wait there for a slot, holding a thread and a subflow run in Running)."""
    return min(requested, CONCURRENCY_LIMITS["tinker-train"]) if on_prefect_server() else requested
