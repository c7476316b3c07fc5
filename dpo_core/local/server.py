"""HTTP front of the local Tinker-compatible server (FastAPI), speaking tinker SDK 0.38's protocol.

Training and sampling routes answer at once with a request id; one engine thread runs the work (one model's
requests in `seq_id` order) and `retrieve_future` long-polls for the result. Every request must carry the
API key the server was started with; `tinker://` paths never leave the storage folder.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import secrets
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dpo_core.local import protocol
from dpo_core.local.engine import Engine, SampleRequest, UserError

log = logging.getLogger("dpo_core.local")

LONG_POLL_SECONDS = 30.0  # the SDK waits up to 45 s per poll; it logs a warning per empty poll
MAX_BODY_BYTES = 256 * 1024 * 1024
KEEP_RESULTS = 4096  # finished results kept for re-polls after a dropped connection


def new_api_key() -> str:
    return "tml-local-" + secrets.token_hex(16)


@dataclass
class FutureRecord:
    done: asyncio.Event
    payload: bytes | None = None
    media_type: str = "application/json"
    created: float = field(default_factory=time.time)


@dataclass(order=True)
class _Job:
    arrival: int
    model_key: str = field(compare=False)
    seq_id: int = field(compare=False)
    request_id: str = field(compare=False)
    run: Callable[[], tuple[bytes, str]] | None = field(compare=False)
    group: str | None = field(default=None, compare=False)  # sampling requests that may share a batch
    item: Any = field(default=None, compare=False)
    rows: int = field(default=0, compare=False)


BatchRunner = Callable[[list[Any]], list[tuple[bytes, str] | Exception]]


class Worker:
    """One thread that runs engine work. Among queued jobs of one model, the lowest seq_id goes first;
    queued sampling requests of the same sampler run together as one batch (up to `max_batch_rows` rows)."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, batch_runner: BatchRunner | None = None,
                 max_batch_rows: int = 256):
        self.engine, self.loop = engine, loop
        self.batch_runner, self.max_batch_rows = batch_runner, max_batch_rows
        self.futures: OrderedDict[str, FutureRecord] = OrderedDict()
        self._jobs: list[_Job] = []
        self._arrivals = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="dpo-local-engine", daemon=True)
        self._thread.start()

    def submit(self, model_key: str, seq_id: int | None, run: Callable[[], tuple[bytes, str]] | None,
               group: str | None = None, item: Any = None, rows: int = 1) -> str:
        request_id = uuid.uuid4().hex
        self.futures[request_id] = FutureRecord(asyncio.Event())
        while len(self.futures) > KEEP_RESULTS:
            oldest = next(iter(self.futures))
            if not self.futures[oldest].done.is_set():
                break
            self.futures.popitem(last=False)
        with self._cond:
            self._jobs.append(_Job(next(self._arrivals), model_key, seq_id or 0, request_id, run, group, item, rows))
            self._cond.notify()
        return request_id

    def _next_jobs(self) -> list[_Job]:
        first = min(self._jobs)
        if first.group is not None:
            batch, rows = [], 0
            for job in sorted(j for j in self._jobs if j.group == first.group):
                if batch and rows + job.rows > self.max_batch_rows:
                    break
                batch.append(job)
                rows += job.rows
            for job in batch:
                self._jobs.remove(job)
            return batch
        same_model = [j for j in self._jobs if j.model_key == first.model_key]
        job = min(same_model, key=lambda j: (j.seq_id, j.arrival)) if first.model_key else first
        self._jobs.remove(job)
        return [job]

    def _run(self, jobs: list[_Job]) -> list[tuple[bytes, str]]:
        if jobs[0].group is not None:
            try:
                outcomes = self.batch_runner([j.item for j in jobs])
            except Exception as exc:
                outcomes = [exc] * len(jobs)
        else:
            try:
                outcomes = [jobs[0].run()]
            except Exception as exc:
                outcomes = [exc]
        replies = []
        for job, outcome in zip(jobs, outcomes):
            if isinstance(outcome, UserError):
                outcome = (json.dumps({"error": str(outcome), "category": "user"}).encode(), "application/json")
            elif isinstance(outcome, Exception):  # a bug or resource problem: reported as a server error
                log.error("request %s failed: %s", job.request_id,
                          "".join(traceback.format_exception(type(outcome), outcome, outcome.__traceback__)))
                outcome = (json.dumps({"error": f"{type(outcome).__name__}: {outcome}", "category": "server"}).encode(),
                           "application/json")
            replies.append(outcome)
        return replies

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                jobs = self._next_jobs()
            for job, (payload, media_type) in zip(jobs, self._run(jobs)):
                self.loop.call_soon_threadsafe(self._finish, job.request_id, payload, media_type)

    def _finish(self, request_id: str, payload: bytes, media_type: str) -> None:
        record = self.futures.get(request_id)
        if record is not None:
            record.payload, record.media_type = payload, media_type
            record.done.set()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


def _json(run: Callable[[], dict[str, Any]]) -> Callable[[], tuple[bytes, str]]:
    return lambda: (json.dumps(run()).encode(), "application/json")


def create_app(engine: Engine, api_key: str, fault_rate: float = 0.0, max_body_bytes: int = MAX_BODY_BYTES,
               fault_seed: int | None = None) -> FastAPI:
    """The ASGI app. `fault_rate` answers that fraction of requests with a transient failure (tests only)."""
    app = FastAPI(title="dpo-suite local Tinker server", docs_url=None, redoc_url=None, openapi_url=None)
    state: dict[str, Any] = {"worker": None, "sessions": {}, "counter": itertools.count(1)}
    fault_random = random.Random(fault_seed)
    app.state.engine = engine
    app.state.fault_counts = {"injected": 0}

    def run_sample_batch(items: list[tuple[Any, SampleRequest]]) -> list[tuple[bytes, str] | Exception]:
        results = engine.sample_batch(items[0][0], [request for _, request in items])
        return [r if isinstance(r, Exception) else (protocol.encode_sample_response(r), protocol.PROTOBUF)
                for r in results]

    def worker() -> Worker:
        if state["worker"] is None:
            state["worker"] = Worker(engine, asyncio.get_running_loop(), run_sample_batch)
        return state["worker"]

    app.state.stop = lambda: state["worker"] and state["worker"].stop()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.headers.get("x-api-key") != api_key:
            return JSONResponse({"error": "missing or wrong API key (X-API-Key)", "category": "user"}, status_code=401)
        length = request.headers.get("content-length")
        if length is not None and int(length) > max_body_bytes:
            return JSONResponse({"error": f"request body over {max_body_bytes} bytes"}, status_code=413)
        # Faults are injected before the request is handled, so a retry never repeats a side effect.
        if fault_rate and request.url.path not in ("/api/v1/create_session", "/api/v1/client/config") \
                and fault_random.random() < fault_rate:
            app.state.fault_counts["injected"] += 1
            kind = fault_random.choice(["500", "429", "503"])
            return JSONResponse({"error": f"injected transient fault ({kind})"}, status_code=int(kind),
                                headers={"Retry-After": "0"})
        return await call_next(request)

    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        return json.loads(raw) if raw else {}

    def future_reply(request_id: str, **extra: Any) -> dict[str, Any]:
        return {"request_id": request_id, **extra}

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
        session_id = "local-" + uuid.uuid4().hex[:12]
        state["sessions"][session_id] = {"created": time.time(), "tags": payload.get("tags", [])}
        return {"type": "create_session", "session_id": session_id}

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request):
        return {"type": "session_heartbeat"}

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish_session(session_id: str):
        # Queued behind the session's own work, so nothing in flight loses its model.
        state["sessions"].pop(session_id, None)
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
        return {"supported_models": [
            {"model_name": spec.name, "max_context_length": spec.max_context_length, "trainable": True,
             "sampleable": True} for spec in engine.served_models()
        ]}

    # ------------------------------------------------------------------ training
    @app.post("/api/v1/create_model")
    async def create_model(request: Request):
        payload = await body(request)
        model_id = f"{payload['session_id']}:train:{payload['model_seq_id']}"
        run = _json(lambda: {"type": "create_model",
                             "model_id": engine.create_model(model_id, payload["base_model"], payload.get("lora_config"))})
        return future_reply(worker().submit(model_id, 0, run), model_id=model_id)

    @app.post("/api/v1/get_info")
    async def get_info(request: Request):
        payload = await body(request)
        try:
            return await asyncio.to_thread(engine.info, payload["model_id"])
        except UserError as exc:
            return JSONResponse({"error": str(exc), "category": "user"}, status_code=404)

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request):
        raw = protocol.maybe_decompress(await request.body(), request.headers.get("content-encoding"))
        try:
            model_id, seq_id, loss_fn, forward_only, data = protocol.decode_forward_backward(raw)
        except UserError as exc:
            return JSONResponse({"error": str(exc), "category": "user"}, status_code=400)

        def run() -> tuple[bytes, str]:
            logprobs, metrics = engine.forward_backward(model_id, data, loss_fn, forward_only)
            return protocol.encode_forward_backward_output(logprobs, metrics), protocol.PROTOBUF

        return future_reply(worker().submit(model_id, seq_id, run), model_id=model_id)

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request):
        payload = await body(request)
        model_id = payload["model_id"]
        params = payload.get("adam_params") or payload.get("optim_params") or {}
        if params.get("type", "adamw") not in ("adamw", "adam"):
            return JSONResponse({"error": f"optimizer {params.get('type')!r} is not supported locally (AdamW only)",
                                 "category": "user"}, status_code=400)
        run = _json(lambda: {"metrics": engine.optim_step(model_id, params)})
        return future_reply(worker().submit(model_id, payload.get("seq_id"), run), model_id=model_id)

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request):
        payload = await body(request)
        model_id = payload["model_id"]
        name = payload.get("path") or f"step-{next(state['counter'])}"
        run = _json(lambda: {"type": "save_weights",
                             "path": engine.save_state(model_id, name, bool(payload.get("overwrite")))})
        return future_reply(worker().submit(model_id, payload.get("seq_id"), run), model_id=model_id)

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request):
        payload = await body(request)
        model_id = payload["model_id"]
        if payload.get("path"):
            run = _json(lambda: {"type": "save_weights_for_sampler",
                                 "path": engine.save_sampler(model_id, payload["path"])})
        else:
            session = model_id.split(":train:")[0]
            sampler_id = f"{session}:sample:{payload.get('sampling_session_seq_id', next(state['counter']))}"
            run = _json(lambda: {"type": "save_weights_for_sampler",
                                 "sampling_session_id": engine.snapshot_sampler(model_id, sampler_id)})
        return future_reply(worker().submit(model_id, payload.get("seq_id"), run), model_id=model_id)

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request):
        payload = await body(request)
        path, optimizer = payload["path"], bool(payload.get("optimizer"))
        if payload.get("model_id"):
            model_id = payload["model_id"]
            run = _json(lambda: (engine.load_weights(model_id, path, optimizer),
                                 {"type": "load_weights", "model_id": model_id, "path": path})[1])
        else:
            model_id = f"{payload['session_id']}:train:{payload['model_seq_id']}"
            run = _json(lambda: {"type": "load_weights", "path": path,
                                 "model_id": engine.create_from_checkpoint(model_id, path, optimizer)})
        return future_reply(worker().submit(model_id, payload.get("seq_id"), run), model_id=model_id)

    @app.post("/api/v1/unload_model")
    async def unload_model(request: Request):
        payload = await body(request)
        model_id = payload["model_id"]
        run = _json(lambda: (engine.models.pop(model_id, None), {"type": "unload_model", "model_id": model_id})[1])
        return future_reply(worker().submit(model_id, None, run), model_id=model_id)

    @app.post("/api/v1/weights_info")
    async def weights_info(request: Request):
        payload = await body(request)
        try:
            meta = await asyncio.to_thread(engine.read_meta, payload.get("tinker_path", ""))
        except UserError as exc:
            return JSONResponse({"error": str(exc), "category": "user"}, status_code=404)
        lora = meta["lora"]
        return {"base_model": meta["base_model"], "is_lora": True, "lora_rank": int(lora["rank"]),
                "train_unembed": lora.get("train_unembed"), "train_mlp": lora.get("train_mlp"),
                "train_attn": lora.get("train_attn")}

    # ------------------------------------------------------------------ sampling
    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request):
        payload = await body(request)
        sampler_id = f"{payload['session_id']}:sample:{payload['sampling_session_seq_id']}"
        try:
            await asyncio.to_thread(engine.create_sampler, sampler_id, payload.get("base_model"),
                                    payload.get("model_path"))
        except UserError as exc:
            return JSONResponse({"error": str(exc), "category": "user"}, status_code=400)
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    @app.post("/api/v1/join_sampling_session")
    async def join_sampling_session(request: Request):
        return {"type": "join_sampling_session", "client_counter": next(state["counter"])}

    @app.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str):
        source = engine.samplers.get(sampler_id)
        if source is None:
            return JSONResponse({"error": f"unknown sampler {sampler_id}"}, status_code=404)
        return {"sampler_id": sampler_id, "base_model": source.base_model, "model_path": source.model_path}

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
            return JSONResponse({"error": str(exc), "category": "user"}, status_code=400)
        request_id = worker().submit("", None, None, group=engine.sample_group_key(source, params),
                                     item=(source, sample_request), rows=max(num_samples, 1))
        return future_reply(request_id, sample_sequence_ids=[f"{request_id}:{i}" for i in range(num_samples)])

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
            return JSONResponse({"error": str(exc), "category": "user"}, status_code=404)

    @app.get("/api/v1/training_runs/{run_id}")
    async def training_run(run_id: str):
        return rest(lambda: engine.training_run(run_id))

    @app.get("/api/v1/training_runs")
    async def training_runs(limit: int = 20, offset: int = 0):
        runs_dir = engine.storage / "runs"
        ids = sorted(p.name for p in runs_dir.iterdir()) if runs_dir.exists() else []
        page = [engine.training_run(i) for i in ids[offset: offset + limit]]
        return {"training_runs": page, "cursor": {"offset": offset, "limit": limit, "total_count": len(ids)}}

    @app.get("/api/v1/training_runs/{run_id}/checkpoints")
    async def run_checkpoints(run_id: str):
        return rest(lambda: {"checkpoints": engine.list_checkpoints(run_id)})

    @app.get("/api/v1/checkpoints")
    async def all_checkpoints(limit: int = 100, offset: int = 0):
        runs_dir = engine.storage / "runs"
        found = [c for p in sorted(runs_dir.iterdir()) for c in engine.list_checkpoints(p.name)] \
            if runs_dir.exists() else []
        return {"checkpoints": found[offset: offset + limit],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(found)}}

    @app.delete("/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
    async def delete_checkpoint(run_id: str, checkpoint_id: str):
        return rest(lambda: (engine.delete_checkpoint(run_id, checkpoint_id), {})[1])

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def unknown(path: str):
        return JSONResponse({"error": f"/{path} is not implemented by the local server"}, status_code=404)

    return app
