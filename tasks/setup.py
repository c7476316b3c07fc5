"""Project setup the flows rely on, created by the project itself so it is never silently absent."""

from __future__ import annotations

from prefect import get_client

# Tag-based limits: simultaneous training runs and sampling/evaluation tasks against Tinker (or the local server).
CONCURRENCY_LIMITS = {"tinker-train": 4, "tinker-sample": 8}


def ensure_concurrency_limits(limits: dict[str, int] = CONCURRENCY_LIMITS) -> None:
    with get_client(sync_client=True) as client:
        for tag, limit in limits.items():
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
