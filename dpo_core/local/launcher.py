"""Start the local server: in-process on a free loopback port (context manager), or as a blocking CLI."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_core.local.engine import Engine
from dpo_core.local.server import ServerLimits, create_app, new_api_key
from dpo_core.settings import Settings, apply_offline_env


SHUTDOWN_S = 3.0  # how long leaving `local_server` waits for the engine and HTTP threads, together


@dataclass
class LocalServer:
    """A running local server: point `tinker.ServiceClient(base_url=..., api_key=...)` at it."""

    base_url: str
    api_key: str
    engine: Engine
    app: Any


def build_engine(settings: Settings, storage: Path | None = None) -> Engine:
    return Engine(
        storage=Path(storage or settings.local_storage),
        cache_dir=settings.cache_dir,
        local_models=settings.local_models,
        device=settings.local_device,
        dtype=settings.local_dtype,
        threads=settings.local_threads,
        micro_batch_tokens=settings.local_micro_batch_tokens,
        graph_cache_tokens=settings.local_graph_cache_tokens,
        stand_in=settings.local_stand_in,
        max_training_models=settings.local_max_training_models,
        recompute_layers=settings.local_recompute_layers,
        mmap_threshold_bytes=settings.local_mmap_threshold_bytes,
        max_snapshots=settings.local_max_snapshots,
        max_snapshots_per_session=settings.local_max_snapshots_per_session,
    )


def server_limits(settings: Settings) -> ServerLimits:
    return ServerLimits(max_body_bytes=settings.local_max_body_bytes,
                        max_json_body_bytes=settings.local_max_json_body_bytes,
                        max_large_bodies=settings.local_max_large_bodies,
                        request_timeout_s=settings.local_request_timeout_s,
                        max_sessions=settings.local_max_sessions, session_idle_s=settings.local_session_idle_s)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def local_server(
    settings: Settings | None = None,
    *,
    storage: Path | None = None,
    api_key: str | None = None,
    host: str | None = None,
    port: int | None = None,
    fault_rate: float | None = None,
    fault_seed: int | None = None,
    engine: Engine | None = None,
) -> Iterator[LocalServer]:
    """Run the server in a background thread of this process for the duration of the block."""
    import uvicorn

    apply_offline_env()
    settings = settings or Settings()
    engine = engine or build_engine(settings, storage)
    api_key = api_key or new_api_key()
    host = host or settings.local_host
    rate = settings.local_fault_rate if fault_rate is None else fault_rate
    app = create_app(engine, api_key, fault_rate=rate, fault_seed=fault_seed, limits=server_limits(settings))
    sock = _bind(host, settings.local_port if port is None else port)
    bound_port = sock.getsockname()[1]
    # A short graceful shutdown: open long-polls are cut after 1 s rather than waited out (up to 30 s).
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                           timeout_keep_alive=30, timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dpo-local-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"local Tinker server failed to start on {host}:{bound_port}")
        time.sleep(0.02)
    shown_host = f"[{host}]" if ":" in host else host
    try:
        yield LocalServer(f"http://{shown_host}:{bound_port}", api_key, engine, app)
    finally:
        # Stop taking work and cancel the running job (at its next step) and end HTTP at once, then wait for
        # both against one deadline: the waits overlap rather than add up (SIGTERM must end a busy server within
        # 5 s, issue 14). The engine goes first, so no torch work outlives the interpreter when it can stop in
        # time (that ended in "terminate called without an active exception"); every open future is answered
        # at `stop`, so long-polls end now rather than at uvicorn's graceful timeout.
        deadline = time.monotonic() + SHUTDOWN_S
        app.state.stop()
        server.should_exit = True
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        app.state.join(max(0.0, deadline - time.monotonic()))
        sock.close()


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def require_key_off_loopback(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond this machine without a key the operator chose: a generated key would only be
    printed to the server's log, which the machines that must use it cannot read."""
    if api_key is None and not is_loopback(host):
        raise ValueError(f"binding {host} (not loopback) needs an explicit key: --api-key tml-... or TINKER_API_KEY; "
                         "give the same key to the clients as TINKER_API_KEY")


def standin_banner() -> str:
    """What a user rehearsing a Tinker run against the stand-in must know and export on the client side."""
    from dpo_core import hf_cache

    home = hf_cache.default_hf_home()
    lines = ["  stand-in: answers like Tinker (its lineup); Qwen/Qwen3-8B trains and samples on a tiny random-init "
             "model with the real Qwen3 tokenizer, so its samples are random text: rehearse the pipeline, not results."]
    if hf_cache.is_primed(home):
        lines += [f"  the client loads the Qwen3 tokenizer by repo id; {home} holds it, so offline export (without "
                  "HF_HUB_OFFLINE=1 the hub client retries for about a minute first):",
                  f"  {hf_cache.offline_exports(home)}"]
    else:
        lines += [f"  the client loads the Qwen3 tokenizer by repo id; offline, put it into {home} first (then export "
                  "what it prints, HF_HUB_OFFLINE=1):",
                  "  .venv/bin/python -m dpo_core prime-hf-cache"]
    return "\n".join(lines)


def serve_forever(settings: Settings, host: str, port: int, storage: Path | None, api_key: str | None,
                  fault_rate: float) -> None:
    """Blocking CLI server; prints the URL (and how to use it) once it is ready."""
    import signal

    require_key_off_loopback(host, api_key)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with local_server(settings, storage=storage, api_key=api_key, host=host, port=port,
                      fault_rate=fault_rate) as server:
        print(f"dpo-suite local Tinker server ready at {server.base_url}", flush=True)
        print(f"  export TINKER_BASE_URL={server.base_url}", flush=True)
        if api_key is None:  # generated for this run only; a key given by the user is never printed
            print(f"  export TINKER_API_KEY={server.api_key}", flush=True)
        print(f"  models: {', '.join(s.name for s in server.engine.served_models())}", flush=True)
        print(f"  storage: {server.engine.storage}", flush=True)
        if settings.local_stand_in == "tinker":
            print(standin_banner(), flush=True)
        try:
            while not stop.wait(0.2):
                pass
        except KeyboardInterrupt:
            pass
