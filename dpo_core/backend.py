"""Build the `tinker.ServiceClient` an entry point hands down: Tinker's cloud, or the local server.

The only module of the client library that starts the local server (`dpo_core.local`); `Backend` bounds its
lifetime."""

from __future__ import annotations

import contextlib
import difflib
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_core.settings import Settings, apply_offline_env

if TYPE_CHECKING:  # `import tinker` imports torch (~4 s): only once a client is built, never in a cached rerun
    import tinker


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


class Backend:
    """The lifetime of the local server(s) of an entry point: entered once, they stop when it exits.

        with Backend():                                  # e.g. in flows/suite.py's __main__
            dpo_suite(config)                            # every service_client(settings) inside, from any
                                                         # thread, shares one server per settings
    A server starts on the first `service_client` that needs it (never, on Tinker), so every task of a flow
    run loads each model once and concurrent sampling requests are batched together. Without an entered
    `Backend`, each `service_client` block runs its own server for its own duration.
    """

    def __init__(self) -> None:
        self._servers: dict[tuple, Any] = {}
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()

    def local_server(self, settings: Settings) -> Any:
        """The running local server for these settings (started on first use): `.base_url`, `.api_key`."""
        from dpo_core.local.launcher import local_server

        key = _server_key(settings)
        with self._lock:
            if key not in self._servers:
                self._servers[key] = self._stack.enter_context(local_server(settings))
            return self._servers[key]

    def __enter__(self) -> Backend:
        with _ACTIVE_LOCK:
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        with _ACTIVE_LOCK:
            _ACTIVE.remove(self)
        self.close()

    def close(self) -> None:
        """Stop every server this backend started."""
        with self._lock:
            self._servers.clear()
            self._stack.close()


# Process-wide on purpose: Prefect runs tasks in worker threads, which must find the entry point's Backend.
_ACTIVE: list[Backend] = []
_ACTIVE_LOCK = threading.Lock()


def current_backend() -> Backend | None:
    """The innermost entered `Backend`, if any."""
    with _ACTIVE_LOCK:
        return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def shared_backend() -> Iterator[Backend]:
    """Enter a `Backend` unless one already is: flows use this, so a subflow run inside a suite run (same
    process) shares the suite's servers, and a flow run alone (a deployment) still gets a bounded one."""
    active = current_backend()
    if active is not None:
        yield active
        return
    with Backend() as entered:
        yield entered


def _server_key(settings: Settings) -> tuple:
    return (str(Path(settings.local_storage).resolve()), str(settings.cache_dir), _frozen(settings.local_models),
            settings.local_device, settings.local_dtype, settings.local_threads, settings.local_fault_rate)


def _frozen(mapping: dict) -> tuple:
    return tuple(sorted((str(k), str(v)) for k, v in mapping.items()))


@contextlib.contextmanager
def service_client(settings: Settings, backend: Backend | None = None) -> Iterator[tinker.ServiceClient]:
    """Tinker when a key is configured (or backend=tinker), else a local server on loopback: the one of
    `backend` (default: the entered `Backend`), or, with none entered, one for the duration of this block.

    The client's session is closed on exit (the local server then frees its training models)."""
    import tinker

    apply_offline_env(settings)
    quiet_sdk_polling()
    with contextlib.ExitStack() as stack:
        if settings.resolved_backend() == "tinker":
            if settings.tinker_api_key is None:
                raise ValueError("backend 'tinker' needs TINKER_API_KEY (or use DPO_BACKEND=local)")
            client = tinker.ServiceClient(api_key=settings.tinker_api_key.get_secret_value(),
                                          base_url=settings.tinker_base_url)
        else:
            from dpo_core import rendering

            # Models named by these settings (perhaps built in code, not from the environment) render offline.
            rendering.register_models(settings.cache_dir, settings.local_models)
            if backend is None:
                backend = current_backend()
            if backend is None:  # private to this block: not entered, so no other thread finds it
                backend = Backend()
                stack.callback(backend.close)
            server = backend.local_server(settings)
            client = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
        status = "errored"
        try:
            yield client
            status = "success"
        finally:
            with contextlib.suppress(Exception):
                client.close(status).result(timeout=30)


def served_models(client: tinker.ServiceClient) -> dict[str, bool]:
    """The base models the service lists, each with whether it can be trained there (an unstated `trainable`,
    as older services answer, counts as trainable)."""
    with warnings.catch_warnings():  # deprecated in favour of tinker.RestClient(...), still supported by 0.38
        warnings.simplefilter("ignore", FutureWarning)
        capabilities = client.create_rest_client().get_server_capabilities().result()
    return {m.model_name: m.trainable is not False for m in capabilities.supported_models if m.model_name}


def not_served_message(model_name: str, served: dict[str, bool], backend: str) -> str | None:
    """Why `model_name` cannot be trained on this service (with what to use instead), or None when it can."""
    from dpo_core import lineup

    if served.get(model_name):
        return None
    where = "the local server" if backend == "local" else "Tinker"
    if model_name in served:
        return f"model {model_name!r} is listed by {where} but not trainable there"
    if backend == "tinker" and lineup.successor(model_name):
        return f"model {model_name!r} is not served by Tinker: {lineup.not_served_message(model_name)}"
    nearest = difflib.get_close_matches(model_name, list(served), n=1, cutoff=0.0)
    hint = f"; nearest available: {nearest[0]}" if nearest else ""
    retired = " (Tinker has retired some models from its lineup)" if backend == "tinker" else ""
    return f"model {model_name!r} is not served by {where}{retired}{hint}. Served: {', '.join(sorted(served))}"


def check_model_supported(client: tinker.ServiceClient, model_name: str, backend: str) -> None:
    """Fail fast, before any training, when the service does not offer `model_name` for training."""
    problem = not_served_message(model_name, served_models(client), backend)
    if problem:
        raise UnsupportedModelError(problem)


def base_model_dir(model_name: str, settings: Settings) -> str:
    """A local HF model folder of the base model (the cookbook reads its config and weight names), or the HF repo id
    for a hub model (read from the HF cache)."""
    from dpo_core import models

    spec = models.model_specs(settings.local_models).get(model_name)
    if spec is None:
        return model_name
    if spec.path is not None:
        return str(spec.path)
    folder = Path(settings.cache_dir) / "models" / ("local-tiny" if spec.kind == "tiny" else "SmolLM2-135M-Instruct")
    if not (folder / "config.json").exists():
        from dpo_core.local import store

        model = store.load_model(model_name, Path(settings.cache_dir), settings.local_models)  # builds SmolLM2's
        if not (folder / "config.json").exists():  # local/tiny lives in memory only: write it once
            from dpo_core.fsutil import atomic_folder

            with atomic_folder(folder, replace=False) as tmp:
                model.save_pretrained(str(tmp))
    return str(folder)
