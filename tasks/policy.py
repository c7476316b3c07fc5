"""What every task shares: JSON results (never pickle), retries on network-level failures only, and the place
a result is computed (backend, folders, device), which enters the cache key of anything a model computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_core.settings import Settings
from tasks.caching import compute_identity

CACHED = {"persist_result": True, "result_serializer": "json"}


def transient_errors() -> tuple[type[BaseException], ...]:
    """The network-level errors worth a retry. Imported here, not at module level: `import tinker` imports torch
    (~4 s), which a cached rerun never needs."""
    import httpx
    import tinker

    return (tinker.APIConnectionError, tinker.APITimeoutError, tinker.InternalServerError,
            tinker.RateLimitError, httpx.TransportError)


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only network-level failures; a user error (bad data, unknown model) fails at once."""
    try:
        state.result()
    except transient_errors():
        return True
    except Exception:
        return False
    return False


NETWORK_RETRIES = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_condition_fn": _transient}


def where(parameters: dict[str, Any] | None = None) -> list[str]:
    """The backend, device and dtype, and the folders results land in: the same config elsewhere is another
    result. Settings come from the worker's environment, so no secret is ever a task input."""
    settings = Settings()
    return [*compute_identity(settings), str(Path(settings.experiments_dir).resolve()),
            str(Path(settings.local_storage).resolve())]
