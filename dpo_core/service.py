"""Which service computes a model's numbers: the identity every cache of a model-computed value is keyed on.

A model name alone does not say which weights answer: the Tinker stand-in serves a tiny random model as
`Qwen/Qwen3-8B`, and two local servers can map one name to different folders (`DPO_LOCAL_MODELS`). A
`ServiceIdentity` adds the backend, the base URL (or, for the local backend's in-process server, whose port
changes every start, just "local"), what the server says it is (the local server and the stand-in say so), the
device and dtype it computes in, and a fingerprint of the served weights where the server gives one (the local
server does; Tinker does not, so there the base URL and the model name stand for the weights).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ServiceIdentity:
    """Where a model's numbers come from. `key()` enters cache keys; `describe()` goes into messages."""

    backend: str  # "tinker" | "local"
    endpoint: str  # the base URL; "local" for the local backend's own server
    model_name: str
    server: str | None = None  # what the server says it is: "dpo-suite-local", "dpo-suite-local (stand-in tinker)"
    compute: str | None = None  # "cpu/float32", as the server reports it
    weights: str | None = None  # "sha256:...", the server's fingerprint of the weights behind model_name

    def key(self) -> str:
        """A stable string of every field: equal keys mean the same weights computed the same way."""
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        """One line for a person, e.g. `Qwen/Qwen3-8B on tinker: dpo-suite-local (stand-in tinker) at
        http://127.0.0.1:8765, weights sha256:ab12cd34ef56, cpu/float32`."""
        where = self.server or self.backend
        at = "" if self.endpoint == "local" else f" at {self.endpoint}"
        weights = f", weights {self.weights[:19]}" if self.weights else ", weights not reported"
        compute = f", {self.compute}" if self.compute else ""
        return f"{self.model_name} on {self.backend}: {where}{at}{weights}{compute}"

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ServiceIdentity:
        return cls(**{k: record.get(k) for k in ("backend", "endpoint", "model_name", "server", "compute",
                                                 "weights")})

    def record(self) -> dict[str, Any]:
        """What config.json stores."""
        return asdict(self)


def raw_capabilities(client: Any) -> dict[str, Any]:
    """The server's get_server_capabilities answer as JSON, with fields the SDK's types drop (the local server's
    weights fingerprints), through the SDK's own transport (auth, retries). Also returns the base URL used."""
    from tinker.lib.client_connection_pool_type import ClientConnectionPoolType

    with warnings.catch_warnings():  # deprecated in favour of tinker.RestClient(...), still supported by 0.38
        warnings.simplefilter("ignore", FutureWarning)
        holder = client.create_rest_client().holder

    async def fetch() -> Any:
        async def send() -> Any:
            with holder.aclient(ClientConnectionPoolType.TRAIN) as http:
                return await http.get("/api/v1/get_server_capabilities", cast_to=object)

        return await holder.execute_with_retries(send)

    answer = holder.run_coroutine_threadsafe(fetch()).result()
    return {"capabilities": answer if isinstance(answer, dict) else {}, "base_url": str(holder._base_url)}


def identify(client: Any, model_name: str, backend: str | None = None) -> ServiceIdentity:
    """The identity of the service `client` talks to, for `model_name`. `backend` is the settings' resolved
    backend; "local" names the in-process server by "local" (its port is new every start), anything else (or
    None: a client built by hand) by its base URL."""
    raw = raw_capabilities(client)
    capabilities, base_url = raw["capabilities"], raw["base_url"]
    server_info = capabilities.get("server") if isinstance(capabilities.get("server"), dict) else {}
    server = server_info.get("kind")
    if server and server_info.get("stand_in"):
        server = f"{server} (stand-in {server_info['stand_in']})"
    entry = next((m for m in capabilities.get("supported_models") or []
                  if isinstance(m, dict) and m.get("model_name") == model_name), {})
    return ServiceIdentity(
        backend=backend or ("local" if server else "tinker"),
        endpoint="local" if backend == "local" else base_url.rstrip("/"),
        model_name=model_name, server=server, compute=server_info.get("compute"),
        weights=entry.get("weights_fingerprint"),
    )
