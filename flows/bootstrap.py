"""The process set-up every flow entry point shares, done on import, before Prefect itself is imported:
hygiene for the HF libraries (offline only on the local backend: the tinker path loads tokenizers by repo id),
and Prefect's analytics off and a patient temporary-server start-up."""

from __future__ import annotations

from dpo_core.settings import Settings, apply_offline_env
from flows.prefect_server import prefect_env_defaults

apply_offline_env(Settings())
prefect_env_defaults()


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

    # The flow modules use `from __future__ import annotations`: resolve their string annotations in the flow's
    # own module now, or Prefect's parameter model would look them up in this module and fail.
    run_with_backend.__signature__ = inspect.signature(flow_function, eval_str=True)
    run_with_backend.__annotations__ = {name: param.annotation
                                        for name, param in run_with_backend.__signature__.parameters.items()}
    return run_with_backend
