"""The local server's one engine thread: a queue of jobs, answered through futures the SDK polls.

Among queued jobs of one model, the lowest `seq_id` goes first (the SDK numbers one model's requests, and
with chunking they may arrive out of order); queued sampling requests of the same sampler and filters run
together as one batched generation. Every outcome becomes a reply: a result, a user error (not retried by the
SDK), or a server error with its traceback logged; the thread survives whatever one job does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpo_core.local.validation import UserError

log = logging.getLogger("dpo_core.local")

KEEP_RESULTS = 4096  # finished results kept for re-polls after a dropped connection

Reply = tuple[bytes, str]  # (body, media type)
BatchRunner = Callable[[list[Any]], list[Reply | Exception]]


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
    run: Callable[[], Reply] | None = field(compare=False)
    group: str | None = field(default=None, compare=False)  # sampling requests that may share a batch
    item: Any = field(default=None, compare=False)
    rows: int = field(default=0, compare=False)


class Worker:
    """One thread that runs engine work; sampling batches hold up to `max_batch_rows` rows."""

    def __init__(self, loop: asyncio.AbstractEventLoop, batch_runner: BatchRunner | None = None,
                 max_batch_rows: int = 256):
        self.loop = loop
        self.batch_runner, self.max_batch_rows = batch_runner, max_batch_rows
        self.futures: OrderedDict[str, FutureRecord] = OrderedDict()
        self._jobs: list[_Job] = []
        self._arrivals = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="dpo-local-engine", daemon=True)
        self._thread.start()

    def submit(self, model_key: str, seq_id: int | None, run: Callable[[], Reply] | None,
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

    def _run(self, jobs: list[_Job]) -> list[Reply]:
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


