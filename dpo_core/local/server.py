"""HTTP front of the local Tinker-compatible server (FastAPI), speaking tinker SDK 0.38's protocol.

Each route parses its request, makes one engine call and replies. Training and sampling routes answer at once
with a request id; the worker thread (`worker.py`) runs the call (one model's requests in `seq_id` order) and
`retrieve_future` long-polls for the result. Every request must carry the API key the server was started with;
`tinker://` paths never leave the storage folder (`checkpoints.py`); ids are spelled by `ids.py`. Session-scoped
routes take only session ids this server issued and has not released (410 otherwise): an invented id would hold
models, samplers and a place under the session cap that no sweep accounts for.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dpo_core.local import ids, protocol
from dpo_core.local import validation as wire
from dpo_core.local.budget import Budget
from dpo_core.local.edge import EdgeGuard, user_error_reply
from dpo_core.local.engine import Engine
from dpo_core.local.exports import add_export_routes
from dpo_core.local.sampler import SampleRequest, SamplerSource
from dpo_core.local.validation import UnknownSession, UserError, W, check_context, parse
from dpo_core.local.worker import Batch, Reply, Worker

LONG_POLL_SECONDS = 30.0  # the SDK waits up to 45 s per poll; it logs a warning per empty poll
INLINE_PARSE_BYTES = 64 * 1024  # bodies past this are decoded on a worker thread, so /healthz keeps answering
_NO_FAULTS = ("/api/v1/create_session", "/api/v1/client/config")  # faults there would end the client at once


@dataclass(frozen=True)
class ServerLimits:
    """What one client may hold or ask of the server (settings `DPO_LOCAL_*`; docs/local-server.md, "Limits")."""

    max_body_bytes: int = 64 * 1024 * 1024  # forward_backward's protobuf body, after decompression
    max_json_body_bytes: int = 1024 * 1024  # every other body (JSON)
    max_large_bodies: int = 2  # bodies over 256 KiB read and decoded at once; the others wait their turn
    request_timeout_s: float = 3600.0  # per engine job (Settings.local_request_timeout_s); stops at the next step
    max_sessions: int = 1024
    session_idle_s: float = 900.0  # a session with no heartbeat for this long is released (the SDK beats ~10 s)


@dataclass
class _Session:
    tags: list[str]
    last_seen: float = field(default_factory=time.monotonic)


def new_api_key() -> str:
    return "tml-local-" + secrets.token_hex(16)


def _json(run: Callable[[], dict[str, Any]]) -> Callable[[], Reply]:
    return lambda: (json.dumps(run()).encode(), "application/json")


def create_app(engine: Engine, api_key: str, fault_rate: float = 0.0, limits: ServerLimits | None = None,
               fault_seed: int | None = None) -> FastAPI:
    """The ASGI app. `fault_rate` answers that fraction of requests with a transient failure (tests only)."""
    limits = limits or ServerLimits()
    app = FastAPI(title="dpo-suite local Tinker server", docs_url=None, redoc_url=None, openapi_url=None)
    workers: list[Worker] = []  # created on the first request, inside the server's event loop
    sessions: dict[str, _Session] = {}
    names = itertools.count(1)  # default checkpoint names and sampler seq ids
    fault_random = random.Random(fault_seed)
    sweep = {"next": 0.0}
    app.state.engine = engine
    app.state.fault_counts = {"injected": 0}
    app.state.limits = limits

    def run_sample_batch(items: list[tuple[SamplerSource, SampleRequest]], batch: Batch) -> None:
        """One continuous batch: requests of the same group join while it decodes; each is answered when done."""
        def answer(position: int, result: dict[str, Any] | Exception) -> None:
            batch.finish(position, result if isinstance(result, Exception)
                         else (protocol.encode_sample_response(result), protocol.PROTOBUF))

        engine.sample_stream(items[0][0], [request for _, request in items], answer,
                             admit=lambda live_rows: [request for _, request in batch.admit(live_rows)])

    def worker() -> Worker:
        if not workers:
            workers.append(Worker(asyncio.get_running_loop(), run_sample_batch,
                                  request_timeout_s=limits.request_timeout_s))
        return workers[0]

    def submit(model_id: str, seq_id: int | None, run: Callable[[], Reply]) -> dict[str, Any]:
        expire_idle_sessions()
        return {"request_id": worker().submit(model_id, seq_id, run), "model_id": model_id}

    def expire_idle_sessions() -> None:
        """Release what sessions without a heartbeat for `session_idle_s` held (checked at most every 5 s)."""
        now = time.monotonic()
        if now < sweep["next"]:
            return
        sweep["next"] = now + min(5.0, limits.session_idle_s / 2)
        expired = [sid for sid, s in sessions.items() if now - s.last_seen > limits.session_idle_s]
        for session_id in expired:
            del sessions[session_id]
        live = set(sessions)
        worker().submit("", None, _json(lambda: {"released": engine.expire_sessions(
            expired, live, limits.session_idle_s)}))

    def inject_fault(path: str) -> JSONResponse | None:
        if fault_rate and path not in _NO_FAULTS and fault_random.random() < fault_rate:
            app.state.fault_counts["injected"] += 1
            kind = fault_random.choice(["500", "429", "503"])
            return JSONResponse({"error": f"injected transient fault ({kind})"}, status_code=int(kind),
                                headers={"Retry-After": "0"})
        return None

    app.state.stop = lambda wait_s=0.0: workers and workers[0].stop(wait_s)
    app.state.join = lambda wait_s: workers[0].join(wait_s) if workers else True  # whether the engine thread ended
    app.add_middleware(EdgeGuard, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       max_json_body_bytes=limits.max_json_body_bytes, max_large_bodies=limits.max_large_bodies,
                       inject_fault=inject_fault)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return user_error_reply(exc)

    async def parsed(request: Request, model: type[W]) -> W:
        return await decoded(functools.partial(parse, model), await request.body())

    async def decoded(decode: Callable[[bytes], Any], body: bytes) -> Any:
        """`decode(body)`, on a worker thread when the body is large: the event loop keeps answering meanwhile."""
        if len(body) <= INLINE_PARSE_BYTES:
            return decode(body)
        return await asyncio.to_thread(decode, body)

    def live_session(session_id: str) -> _Session:
        """The issued, live session `session_id` (its use counts as a sign of life); a 410 otherwise."""
        session = sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"session {session_id!r} is not live on this server: never issued by it, finished, "
                                 f"or released after {limits.session_idle_s:g} s without a heartbeat "
                                 "(DPO_LOCAL_SESSION_IDLE_S), or the server restarted; create a new ServiceClient")
        session.last_seen = time.monotonic()
        return session

    # ------------------------------------------------------------------ session
    @app.post("/api/v1/client/config")
    async def client_config(request: Request):
        # Plain httpx transport and strictly ordered fwd/bwd requests keep one model's work in seq_id order.
        return {"use_pyqwest_transport": False, "parallel_fwdbwd_chunks": False, "proto_compress_fwdbwd": False}

    @app.post("/api/v1/client/dynamic_config")
    async def dynamic_config(request: Request):
        return {}

    @app.post("/api/v1/create_session")
    async def create_session(request: Request):
        payload = await parsed(request, wire.CreateSession)
        expire_idle_sessions()
        if len(sessions) >= limits.max_sessions:
            raise UserError(f"the server holds {len(sessions)} live sessions, its cap "
                            "(DPO_LOCAL_MAX_SESSIONS): finish a session first")
        session_id = ids.new_session_id()
        sessions[session_id] = _Session(list(payload.tags))
        return {"type": "create_session", "session_id": session_id}

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request):
        # An unknown id is refused, never registered: heartbeats of invented ids filled the session cap. 410 is
        # what ends the SDK's heartbeat loop for a session that is over.
        live_session((await parsed(request, wire.Heartbeat)).session_id)
        return {"type": "session_heartbeat"}

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish_session(session_id: str):
        # Queued behind the session's own work, so nothing in flight loses its model.
        sessions.pop(session_id, None)
        worker().submit("", None, _json(lambda: {"released": engine.release_session(session_id)}))
        return {}

    @app.post("/api/v1/telemetry")
    async def telemetry(request: Request):
        return {"status": "accepted"}

    @app.get("/api/v1/healthz")
    async def healthz():
        # The watchdog: a dead engine thread, or one job far past its budget, is not healthy.
        problem = workers[0].health(limits.request_timeout_s + 60.0) if workers else None
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "error": problem}, status_code=503)
        return {"status": "ok"}

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities():
        # The stand-in lists Tinker's whole lineup but marks what it cannot back as neither trainable nor sampleable.
        # Beyond Tinker's fields (the SDK ignores extra ones): each model's weights fingerprint and the server's
        # identity, which the client keys every cache of a model-computed value on (dpo_core/service.py).
        return await asyncio.to_thread(lambda: {
            "supported_models": [
                {"model_name": spec.name, "max_context_length": spec.max_context_length,
                 "trainable": engine.can_load(spec), "sampleable": engine.can_load(spec),
                 "weights_fingerprint": engine.store.weights_fingerprint(spec)}
                for spec in engine.served_models()],
            "server": {"kind": "dpo-suite-local", "stand_in": engine.store.stand_in,
                       "compute": engine.store.compute},
        })

    # ------------------------------------------------------------------ training
    @app.post("/api/v1/create_model")
    async def create_model(request: Request):
        payload = await parsed(request, wire.CreateModel)
        live_session(payload.session_id)
        model_id = ids.training_model_id(payload.session_id, payload.model_seq_id)
        lora = payload.lora_config.model_dump() if payload.lora_config else None
        return submit(model_id, 0, _json(lambda: {"type": "create_model", "model_id": engine.create_model(
            model_id, payload.base_model, lora, payload.user_metadata)}))

    @app.post("/api/v1/get_info")
    async def get_info(request: Request):
        payload = await parsed(request, wire.ModelRequest)
        try:
            return await asyncio.to_thread(engine.info, payload.model_id)
        except UserError as exc:
            return user_error_reply(exc, 404)

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request):
        model_id, seq_id, loss_fn, forward_only, data = await decoded(protocol.decode_forward_backward,
                                                                      await request.body())
        context = engine.model_context_length(model_id)
        for index, datum in enumerate(data):
            check_context(len(datum.tokens), context, f"data[{index}].model_input")

        def run() -> Reply:
            logprobs, metrics = engine.forward_backward(model_id, data, loss_fn, forward_only)
            return protocol.encode_forward_backward_output(logprobs, metrics), protocol.PROTOBUF

        return submit(model_id, seq_id, run)

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request):
        payload = await parsed(request, wire.OptimStep)
        params = payload.adam_params.model_dump()
        return submit(payload.model_id, payload.seq_id,
                      _json(lambda: {"metrics": engine.optim_step(payload.model_id, params)}))

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request):
        payload = await parsed(request, wire.SaveWeights)
        name = payload.path or f"step-{next(names)}"
        return submit(payload.model_id, payload.seq_id, _json(lambda: {"type": "save_weights", "path": (
            engine.save_state(payload.model_id, name, payload.overwrite, payload.ttl_seconds))}))

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request):
        payload = await parsed(request, wire.SaveWeightsForSampler)
        model_id = payload.model_id
        if payload.path:
            run = _json(lambda: {"type": "save_weights_for_sampler",
                                 "path": engine.save_sampler(model_id, payload.path, payload.ttl_seconds)})
        else:  # an ephemeral sampler over the current weights, owned by the model's session
            seq = payload.sampling_session_seq_id
            sampler_id = ids.sampler_id(ids.session_of(model_id), next(names) if seq is None else seq)
            run = _json(lambda: {"type": "save_weights_for_sampler",
                                 "sampling_session_id": engine.snapshot_sampler(model_id, sampler_id)})
        return submit(model_id, payload.seq_id, run)

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request):
        payload = await parsed(request, wire.LoadWeights)
        path, optimizer = payload.path, payload.optimizer
        if payload.model_id:
            model_id = payload.model_id
            load = lambda: engine.load_weights(model_id, path, optimizer)  # noqa: E731
        else:  # create-from-state: a new training model in the client's session
            live_session(payload.session_id)
            model_id = ids.training_model_id(payload.session_id, payload.model_seq_id)
            load = lambda: engine.create_from_checkpoint(model_id, path, optimizer)  # noqa: E731
        return submit(model_id, payload.seq_id,
                      _json(lambda: {"type": "load_weights", "path": path, "model_id": load()}))

    @app.post("/api/v1/unload_model")
    async def unload_model(request: Request):
        model_id = (await parsed(request, wire.ModelRequest)).model_id
        return submit(model_id, None,
                      _json(lambda: {"type": "unload_model", "model_id": engine.unload_model(model_id)}))

    @app.post("/api/v1/weights_info")
    async def weights_info(request: Request):
        payload = await parsed(request, wire.WeightsInfo)
        try:
            return await asyncio.to_thread(engine.weights_info, payload.tinker_path)
        except UserError as exc:
            return user_error_reply(exc, 404)

    # ------------------------------------------------------------------ sampling
    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request):
        payload = await parsed(request, wire.CreateSamplingSession)
        live_session(payload.session_id)
        sampler_id = ids.sampler_id(payload.session_id, payload.sampling_session_seq_id)
        await asyncio.to_thread(engine.create_sampler, sampler_id, payload.base_model, payload.model_path)
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    @app.post("/api/v1/join_sampling_session")
    async def join_sampling_session(request: Request):
        return {"type": "join_sampling_session", "client_counter": next(names)}

    @app.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str):
        try:
            return engine.sampler_info(sampler_id)
        except UserError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)

    @app.post("/api/v1/asample")
    async def asample(request: Request):
        payload = await parsed(request, wire.Sample)
        source = engine.sampler_source(payload.sampling_session_id, payload.base_model, payload.model_path)
        prompt, params = payload.prompt.tokens, payload.sampling_params.model_dump()
        context = engine.context_length(source.base_model)
        check_context(len(prompt), context, "prompt")
        max_tokens = 16 if params["max_tokens"] is None else params["max_tokens"]
        check_context(len(prompt) + max_tokens, context, "sampling_params.max_tokens", "prompt + max_tokens")
        job_budget = Budget(limits.request_timeout_s)
        sample_request = SampleRequest(prompt, payload.num_samples, params, bool(payload.prompt_logprobs),
                                       payload.topk_prompt_logprobs, budget=job_budget)
        expire_idle_sessions()
        request_id = worker().submit("", None, None, group=engine.sample_group_key(source, params),
                                     item=(source, sample_request), rows=payload.num_samples, budget=job_budget)
        return {"request_id": request_id,
                "sample_sequence_ids": [f"{request_id}:{i}" for i in range(payload.num_samples)]}

    # ------------------------------------------------------------------ futures
    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request):
        request_id = (await parsed(request, wire.FutureRequest)).request_id
        record = worker().futures.get(request_id)
        if record is None:
            return JSONResponse({"error": f"unknown request_id {request_id!r}", "category": "user"})
        try:
            await asyncio.wait_for(record.done.wait(), timeout=LONG_POLL_SECONDS)
        except asyncio.TimeoutError:
            return {"type": "try_again", "request_id": request_id, "queue_state": "active"}
        return Response(content=record.payload, media_type=record.media_type)

    @app.post("/api/v1/cancel_future")
    async def cancel_future(request: Request):
        # Queued: answered "cancelled" at once; running: it stops at its next decode step or micro-batch.
        return {"cancelled": worker().cancel((await parsed(request, wire.FutureRequest)).request_id)}

    # ------------------------------------------------------------------ REST
    def rest(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except UserError as exc:
            return user_error_reply(exc, 404)

    @app.get("/api/v1/training_runs/{run_id}")
    async def training_run(run_id: str):
        return rest(lambda: engine.training_run(run_id))

    @app.get("/api/v1/training_runs")
    async def training_runs(limit: int = 20, offset: int = 0):
        return engine.training_runs_page(limit, offset)

    @app.get("/api/v1/training_runs/{run_id}/checkpoints")
    async def run_checkpoints(run_id: str):
        return rest(lambda: {"checkpoints": engine.list_checkpoints(run_id)})

    @app.get("/api/v1/checkpoints")
    async def all_checkpoints(limit: int = 100, offset: int = 0):
        return engine.checkpoints_page(limit, offset)

    @app.delete("/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
    async def delete_checkpoint(run_id: str, checkpoint_id: str):
        return rest(lambda: engine.delete_checkpoint(run_id, checkpoint_id) or {})

    add_export_routes(app, engine, api_key, lambda model_id, seq_id, run: submit(model_id, seq_id, run), parsed,
                      rest, names)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def unknown(path: str):
        return JSONResponse({"error": f"/{path} is not implemented by the local server"}, status_code=404)

    return app
