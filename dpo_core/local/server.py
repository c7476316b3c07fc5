"""HTTP front of the local Tinker-compatible server (FastAPI), speaking tinker SDK 0.38's protocol.

Each route parses its request, makes one engine call and replies. Training and sampling routes answer at once
with a request id; the worker thread (`worker.py`) runs the call (one model's requests in `seq_id` order) and
`retrieve_future` long-polls for the result. Every request must carry the API key the server was started with;
`tinker://` paths never leave the storage folder (`checkpoints.py`); ids are spelled by `ids.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import secrets
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dpo_core.local import ids, protocol
from dpo_core.local.engine import Engine
from dpo_core.local.sampler import SampleRequest, SamplerSource
from dpo_core.local.validation import UserError, check_optimizer
from dpo_core.local.worker import Reply, Worker

LONG_POLL_SECONDS = 30.0  # the SDK waits up to 45 s per poll; it logs a warning per empty poll
MAX_BODY_BYTES = 256 * 1024 * 1024
_NO_FAULTS = ("/api/v1/create_session", "/api/v1/client/config")  # faults there would end the client at once


def new_api_key() -> str:
    return "tml-local-" + secrets.token_hex(16)


def _json(run: Callable[[], dict[str, Any]]) -> Callable[[], Reply]:
    return lambda: (json.dumps(run()).encode(), "application/json")


def _user_error(exc: UserError, status_code: int) -> JSONResponse:
    return JSONResponse({"error": str(exc), "category": "user"}, status_code=status_code)


def create_app(engine: Engine, api_key: str, fault_rate: float = 0.0, max_body_bytes: int = MAX_BODY_BYTES,
               fault_seed: int | None = None) -> FastAPI:
    """The ASGI app. `fault_rate` answers that fraction of requests with a transient failure (tests only)."""
    app = FastAPI(title="dpo-suite local Tinker server", docs_url=None, redoc_url=None, openapi_url=None)
    workers: list[Worker] = []  # created on the first request, inside the server's event loop
    sessions: dict[str, list[str]] = {}
    names = itertools.count(1)  # default checkpoint names and sampler seq ids
    fault_random = random.Random(fault_seed)
    app.state.engine = engine
    app.state.fault_counts = {"injected": 0}

    def run_sample_batch(items: list[tuple[SamplerSource, SampleRequest]]) -> list[Reply | Exception]:
        results = engine.sample_batch(items[0][0], [request for _, request in items])
        return [r if isinstance(r, Exception) else (protocol.encode_sample_response(r), protocol.PROTOBUF)
                for r in results]

    def worker() -> Worker:
        if not workers:
            workers.append(Worker(asyncio.get_running_loop(), run_sample_batch))
        return workers[0]

    def submit(model_id: str, seq_id: int | None, run: Callable[[], Reply]) -> dict[str, Any]:
        return {"request_id": worker().submit(model_id, seq_id, run), "model_id": model_id}

    app.state.stop = lambda: workers and workers[0].stop()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.headers.get("x-api-key") != api_key:
            return JSONResponse({"error": "missing or wrong API key (X-API-Key)", "category": "user"}, status_code=401)
        length = request.headers.get("content-length")
        if length is not None and int(length) > max_body_bytes:
            return JSONResponse({"error": f"request body over {max_body_bytes} bytes"}, status_code=413)
        # Faults are injected before the request is handled, so a retry never repeats a side effect.
        if fault_rate and request.url.path not in _NO_FAULTS and fault_random.random() < fault_rate:
            app.state.fault_counts["injected"] += 1
            kind = fault_random.choice(["500", "429", "503"])
            return JSONResponse({"error": f"injected transient fault ({kind})"}, status_code=int(kind),
                                headers={"Retry-After": "0"})
        return await call_next(request)

    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        return json.loads(raw) if raw else {}

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
        payload = await body(request)
        session_id = ids.new_session_id()
        sessions[session_id] = payload.get("tags", [])
        return {"type": "create_session", "session_id": session_id}

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request):
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
        return {"status": "ok"}

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities():
        # The stand-in lists Tinker's whole lineup but marks what it cannot back as neither trainable nor sampleable.
        return {"supported_models": [
            {"model_name": spec.name, "max_context_length": spec.max_context_length,
             "trainable": engine.can_load(spec), "sampleable": engine.can_load(spec)}
            for spec in engine.served_models()
        ]}

    # ------------------------------------------------------------------ training
    @app.post("/api/v1/create_model")
    async def create_model(request: Request):
        payload = await body(request)
        model_id = ids.training_model_id(payload["session_id"], payload["model_seq_id"])
        return submit(model_id, 0, _json(lambda: {"type": "create_model", "model_id": engine.create_model(
            model_id, payload["base_model"], payload.get("lora_config"))}))

    @app.post("/api/v1/get_info")
    async def get_info(request: Request):
        payload = await body(request)
        try:
            return await asyncio.to_thread(engine.info, payload["model_id"])
        except UserError as exc:
            return _user_error(exc, 404)

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request):
        raw = protocol.maybe_decompress(await request.body(), request.headers.get("content-encoding"))
        try:
            model_id, seq_id, loss_fn, forward_only, data = protocol.decode_forward_backward(raw)
        except UserError as exc:
            return _user_error(exc, 400)

        def run() -> Reply:
            logprobs, metrics = engine.forward_backward(model_id, data, loss_fn, forward_only)
            return protocol.encode_forward_backward_output(logprobs, metrics), protocol.PROTOBUF

        return submit(model_id, seq_id, run)

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request):
        payload = await body(request)
        try:
            params = check_optimizer(payload.get("adam_params") or payload.get("optim_params") or {})
        except UserError as exc:
            return _user_error(exc, 400)
        return submit(payload["model_id"], payload.get("seq_id"),
                      _json(lambda: {"metrics": engine.optim_step(payload["model_id"], params)}))

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request):
        payload = await body(request)
        name = payload.get("path") or f"step-{next(names)}"
        return submit(payload["model_id"], payload.get("seq_id"), _json(lambda: {"type": "save_weights", "path": (
            engine.save_state(payload["model_id"], name, bool(payload.get("overwrite"))))}))

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request):
        payload = await body(request)
        model_id = payload["model_id"]
        if payload.get("path"):
            run = _json(lambda: {"type": "save_weights_for_sampler",
                                 "path": engine.save_sampler(model_id, payload["path"])})
        else:  # an ephemeral sampler over the current weights, owned by the model's session
            sampler_id = ids.sampler_id(ids.session_of(model_id),
                                        payload.get("sampling_session_seq_id", next(names)))
            run = _json(lambda: {"type": "save_weights_for_sampler",
                                 "sampling_session_id": engine.snapshot_sampler(model_id, sampler_id)})
        return submit(model_id, payload.get("seq_id"), run)

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request):
        payload = await body(request)
        path, optimizer = payload["path"], bool(payload.get("optimizer"))
        if payload.get("model_id"):
            model_id = payload["model_id"]
            load = lambda: engine.load_weights(model_id, path, optimizer)  # noqa: E731
        else:  # create-from-state: a new training model in the client's session
            model_id = ids.training_model_id(payload["session_id"], payload["model_seq_id"])
            load = lambda: engine.create_from_checkpoint(model_id, path, optimizer)  # noqa: E731
        return submit(model_id, payload.get("seq_id"),
                      _json(lambda: {"type": "load_weights", "path": path, "model_id": load()}))

    @app.post("/api/v1/unload_model")
    async def unload_model(request: Request):
        payload = await body(request)
        model_id = payload["model_id"]
        return submit(model_id, None,
                      _json(lambda: {"type": "unload_model", "model_id": engine.unload_model(model_id)}))

    @app.post("/api/v1/weights_info")
    async def weights_info(request: Request):
        payload = await body(request)
        try:
            return await asyncio.to_thread(engine.weights_info, payload.get("tinker_path", ""))
        except UserError as exc:
            return _user_error(exc, 404)

    # ------------------------------------------------------------------ sampling
    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request):
        payload = await body(request)
        sampler_id = ids.sampler_id(payload["session_id"], payload["sampling_session_seq_id"])
        try:
            await asyncio.to_thread(engine.create_sampler, sampler_id, payload.get("base_model"),
                                    payload.get("model_path"))
        except UserError as exc:
            return _user_error(exc, 400)
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
        payload = await body(request)
        num_samples = int(payload.get("num_samples", 1))
        params = payload.get("sampling_params") or {}
        try:
            source = engine.sampler_source(payload.get("sampling_session_id"), payload.get("base_model"),
                                           payload.get("model_path"))
            sample_request = SampleRequest(protocol.prompt_tokens(payload.get("prompt")), num_samples, params,
                                           bool(payload.get("prompt_logprobs")),
                                           int(payload.get("topk_prompt_logprobs") or 0))
        except UserError as exc:
            return _user_error(exc, 400)
        request_id = worker().submit("", None, None, group=engine.sample_group_key(source, params),
                                     item=(source, sample_request), rows=max(num_samples, 1))
        return {"request_id": request_id, "sample_sequence_ids": [f"{request_id}:{i}" for i in range(num_samples)]}

    # ------------------------------------------------------------------ futures
    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request):
        payload = await body(request)
        record = worker().futures.get(payload.get("request_id", ""))
        if record is None:
            return JSONResponse({"error": f"unknown request_id {payload.get('request_id')!r}", "category": "user"})
        try:
            await asyncio.wait_for(record.done.wait(), timeout=LONG_POLL_SECONDS)
        except asyncio.TimeoutError:
            return {"type": "try_again", "request_id": payload["request_id"], "queue_state": "active"}
        return Response(content=record.payload, media_type=record.media_type)

    @app.post("/api/v1/cancel_future")
    async def cancel_future(request: Request):
        return {}

    # ------------------------------------------------------------------ REST
    def rest(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except UserError as exc:
            return _user_error(exc, 404)

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

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def unknown(path: str):
        return JSONResponse({"error": f"/{path} is not implemented by the local server"}, status_code=404)

    return app
