"""The process set-up every flow entry point shares, done on import, before Prefect itself is imported:
offline hygiene for the HF libraries, and Prefect's analytics off and a patient temporary-server start-up."""

from __future__ import annotations

import os

from dpo_core.settings import apply_offline_env

apply_offline_env()
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def with_shared_backend(flow_function):
    """Run a flow body inside one `shared_backend()`: every task of the run (and every subflow, which reuses the
    active one) talks to the same local server, so models load once and concurrent sampling batches together.
    Put it under `@flow(...)`; Prefect reads the wrapped function's signature."""
    import functools
    import inspect

    @functools.wraps(flow_function)
    def run_with_backend(*args, **kwargs):
        from dpo_core.backend import shared_backend

        with shared_backend():
            return flow_function(*args, **kwargs)

    # Prefect resolves string annotations (`from __future__ import annotations`) in the namespace of the function
    # it is given, this module, which lacks the flow's parameter types: hand it the evaluated signature.
    run_with_backend.__signature__ = inspect.signature(flow_function, eval_str=True)
    return run_with_backend
