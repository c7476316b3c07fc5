"""Build the `tinker.ServiceClient` an entry point hands down: Tinker's cloud, or the local server."""

from __future__ import annotations

import atexit
import contextlib
import difflib
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tinker

from dpo_core.settings import Settings, apply_offline_env


class _DropTryAgain(logging.Filter):
    """The SDK logs a WARNING for every empty long-poll of a queued request: routine, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "because of try_again" not in record.getMessage()


def quiet_sdk_polling() -> None:
    logger = logging.getLogger("tinker.lib.api_future_impl")
    if not any(isinstance(f, _DropTryAgain) for f in logger.filters):
        logger.addFilter(_DropTryAgain())


class UnsupportedModelError(ValueError):
    """The backend does not serve the requested base model; the message lists what it does serve."""


_SHARED: dict[tuple, Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared_local_server(settings: Settings) -> Any:
    """One local server per process and settings, shared by every task of a flow run: models load once and
    concurrent sampling requests are batched together. Stopped when the process exits."""
    from dpo_core import rendering
    from dpo_core.local.launcher import local_server

    key = (str(Path(settings.local_storage).resolve()), str(settings.cache_dir), _frozen(settings.local_models),
           settings.local_device, settings.local_threads, settings.local_fault_rate)
    with _SHARED_LOCK:
        if key not in _SHARED:
            rendering.register_builtin(settings.cache_dir, settings.local_models)
            context = local_server(settings)
            _SHARED[key] = context.__enter__()
            atexit.register(context.__exit__, None, None, None)
        return _SHARED[key]


def _frozen(mapping: dict) -> tuple:
    return tuple(sorted((str(k), str(v)) for k, v in mapping.items()))


@contextlib.contextmanager
def service_client(settings: Settings) -> Iterator[tinker.ServiceClient]:
    """Tinker when a key is configured (or backend=tinker), else this process's local server on loopback.

    The client's session is closed on exit (the local server then frees its training models)."""
    apply_offline_env()
    quiet_sdk_polling()
    if settings.resolved_backend() == "tinker":
        if settings.tinker_api_key is None:
            raise ValueError("backend 'tinker' needs TINKER_API_KEY (or use DPO_BACKEND=local)")
        client = tinker.ServiceClient(api_key=settings.tinker_api_key.get_secret_value(),
                                      base_url=settings.tinker_base_url)
    else:
        server = _shared_local_server(settings)
        client = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    status = "errored"
    try:
        yield client
        status = "success"
    finally:
        with contextlib.suppress(Exception):
            client.close(status).result(timeout=30)


def check_model_supported(client: tinker.ServiceClient, model_name: str, backend: str) -> None:
    """Fail fast, before any training, when the service does not offer `model_name`."""
    with warnings.catch_warnings():  # deprecated in favour of tinker.RestClient(...), still supported by 0.38
        warnings.simplefilter("ignore", FutureWarning)
        capabilities = client.create_rest_client().get_server_capabilities().result()
    served = [m.model_name for m in capabilities.supported_models if m.model_name]
    if model_name in served:
        return
    nearest = difflib.get_close_matches(model_name, served, n=1, cutoff=0.0)
    where = "the local server" if backend == "local" else "Tinker"
    hint = f"; nearest available: {nearest[0]}" if nearest else ""
    retired = " (Tinker has retired some models from its lineup)" if backend == "tinker" else ""
    raise UnsupportedModelError(
        f"model {model_name!r} is not served by {where}{retired}{hint}. Served: {', '.join(sorted(served))}"
    )
