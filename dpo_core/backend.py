"""Build the `tinker.ServiceClient` an entry point hands down: Tinker's cloud, or the local server."""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterator

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


@contextlib.contextmanager
def service_client(settings: Settings) -> Iterator[tinker.ServiceClient]:
    """Tinker when a key is configured (or backend=tinker), else an in-process local server on loopback."""
    apply_offline_env()
    quiet_sdk_polling()
    if settings.resolved_backend() == "tinker":
        if settings.tinker_api_key is None:
            raise ValueError("backend 'tinker' needs TINKER_API_KEY (or use DPO_BACKEND=local)")
        yield tinker.ServiceClient(api_key=settings.tinker_api_key.get_secret_value(),
                                   base_url=settings.tinker_base_url)
        return
    from dpo_core import rendering
    from dpo_core.local.launcher import local_server

    rendering.register_builtin(settings.cache_dir, settings.local_models)
    with local_server(settings) as server:
        yield tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)


def check_model_supported(client: tinker.ServiceClient, model_name: str, backend: str) -> None:
    """Fail fast, before any training, when the service does not offer `model_name`."""
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
