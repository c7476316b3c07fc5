"""Project setup the flows rely on, created by the project itself so it is never silently absent."""

from __future__ import annotations

from prefect import get_client

# Tag-based limits: simultaneous training runs and sampling/evaluation tasks against Tinker (or the local server).
CONCURRENCY_LIMITS = {"tinker-train": 4, "tinker-sample": 8}


def ensure_concurrency_limits(limits: dict[str, int] = CONCURRENCY_LIMITS) -> bool:
    """Create the tag limits on a real Prefect server (PREFECT_API_URL set, e.g. by deployments/dpo.sh).

    Runs on Prefect's temporary server skip them: a process killed while holding a slot kept it there (its
    lease was never reclaimed while we watched, 9+ minutes), which blocked the rerun that should resume it.
    Returns whether the limits are in place.
    """
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return False
    with get_client(sync_client=True) as client:
        for tag, limit in limits.items():
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
    return True
