"""The local server's one engine thread: a queue of jobs, answered through futures the SDK polls.

Among queued jobs of one model, the lowest `seq_id` goes first (the SDK numbers one model's requests, and
with chunking they may arrive out of order); queued sampling requests of the same sampler and filters run
together as one batched generation, which keeps taking requests of its group while it decodes (continuous
batching: they join at its next step, `Batch.admit`) and answers each as soon as it is done (`Batch.finish`).
It admits only requests that arrived before any queued job of another kind, so a stream of sampling requests
cannot starve a training step or another sampler queued behind it. Every outcome becomes a reply: a result, a user error (not retried by the
SDK), or a server error with its traceback logged; the thread survives whatever one job does: even a fault in
the queue itself fails the jobs at hand, not the thread. Each job runs under a `Budget` (time limit, cancel
flag) that long jobs check between steps; `health()` reports a dead or stuck thread to `/healthz`.
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

from dpo_core.local import budget as budgets
from dpo_core.local.validation import UserError

log = logging.getLogger("dpo_core.local")

KEEP_RESULTS = 4096  # finished results kept for re-polls after a dropped connection

Reply = tuple[bytes, str]  # (body, media type)
BatchRunner = Callable[[list[Any], "Batch"], None]  # (the first jobs' items, the batch's link to the queue)


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
    budget: budgets.Budget = field(default_factory=budgets.Budget, compare=False)
    started: float | None = field(default=None, compare=False)  # when the engine took it (monotonic)


class Batch:
    """A running sampling batch's link to the queue: requests of its group join it, each is answered when done.

    Positions number the batch's jobs: the first ones, then the admitted ones in the order `admit` returned
    them. Every method is called from the engine thread.
    """

    def __init__(self, worker: Worker, jobs: list[_Job]):
        self.worker, self.jobs = worker, list(jobs)
        self.answered = [False] * len(self.jobs)

    def admit(self, live_rows: int) -> list[Any]:
        """The items of queued jobs of this batch's group that join it now, within the batch's row cap."""
        worker = self.worker
        with worker._cond:
            if worker._stopped:
                return []
            group = self.jobs[0].group
            first_other = min((j.arrival for j in worker._jobs if j.group != group), default=None)
            room = worker.max_batch_rows - live_rows
            taken: list[_Job] = []
            for job in sorted(j for j in worker._jobs if j.group == group):
                if first_other is not None and job.arrival > first_other:
                    break  # arrived after another kind of job: that one goes first
                if job.rows > room and (taken or live_rows):
                    break
                taken.append(job)
                room -= job.rows
            now = time.monotonic()
            for job in taken:
                worker._jobs.remove(job)
                job.budget.start()
                job.started = now
            worker._running.extend(taken)
        self.jobs.extend(taken)
        self.answered.extend([False] * len(taken))
        return [job.item for job in taken]

    def finish(self, position: int, outcome: Reply | Exception) -> None:
        """Answer the job at `position` now (once; a later answer for it is ignored)."""
        if self.answered[position]:
            return
        self.answered[position] = True
        job = self.jobs[position]
        self.worker._reply([job], [outcome])
        with self.worker._cond:
            if job in self.worker._running:
                self.worker._running.remove(job)
            self.worker._running_since = min((j.started for j in self.worker._running if j.started is not None),
                                             default=None)

    def fail_unanswered(self, error: Exception) -> None:
        for position in range(len(self.jobs)):
            self.finish(position, error)


class Worker:
    """One thread that runs engine work; sampling batches hold up to `max_batch_rows` rows."""

    def __init__(self, loop: asyncio.AbstractEventLoop, batch_runner: BatchRunner | None = None,
                 max_batch_rows: int = 256, request_timeout_s: float = float("inf")):
        self.loop = loop
        self.batch_runner, self.max_batch_rows = batch_runner, max_batch_rows
        self.request_timeout_s = request_timeout_s
        self._running: list[_Job] = []  # what the thread works on now (for cancel and the watchdog)
        self._running_since: float | None = None
        self.futures: OrderedDict[str, FutureRecord] = OrderedDict()
        self._jobs: list[_Job] = []
        self._arrivals = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="dpo-local-engine", daemon=True)
        self._thread.start()

    def submit(self, model_key: str, seq_id: int | None, run: Callable[[], Reply] | None,
               group: str | None = None, item: Any = None, rows: int = 1,
               budget: budgets.Budget | None = None) -> str:
        """Queue a job; `seq_id` orders one model's jobs (an int: anything else would break the ordering)."""
        if seq_id is not None and (not isinstance(seq_id, int) or isinstance(seq_id, bool)):
            raise UserError(f"seq_id must be an integer, got {seq_id!r}")
        request_id = uuid.uuid4().hex
        self.futures[request_id] = FutureRecord(asyncio.Event())
        while len(self.futures) > KEEP_RESULTS:
            oldest = next(iter(self.futures))
            if not self.futures[oldest].done.is_set():
                break
            self.futures.popitem(last=False)
        with self._cond:
            if self._stopped:
                raise UserError("the server is shutting down")
            self._jobs.append(_Job(next(self._arrivals), model_key, seq_id or 0, request_id, run, group, item, rows,
                                   budget or budgets.Budget(self.request_timeout_s)))
            self._cond.notify()
        return request_id

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued job (answered at once) or a running one (it stops at its next step)."""
        with self._cond:
            for job in self._jobs:
                if job.request_id == request_id:
                    self._jobs.remove(job)
                    job.budget.cancel()
                    self._reply([job], [budgets.JobInterrupted("request cancelled")])
                    return True
            for job in self._running:
                if job.request_id == request_id:
                    job.budget.cancel()
                    return True
        return False

    def health(self, stuck_after_s: float) -> str | None:
        """What is wrong with the engine thread (dead, or one job running far past its budget), or None."""
        if self._stopped:  # it takes no more jobs, even while it still winds down the one it ran
            return "the engine thread has stopped"
        if not self._thread.is_alive():
            return "the engine thread died"
        since = self._running_since
        if since is not None and time.monotonic() - since > stuck_after_s:
            return f"the engine has been busy with one job for {time.monotonic() - since:.0f} s"
        return None

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

    def _run(self, jobs: list[_Job]) -> list[Reply | Exception] | None:
        """The jobs' outcomes, or None when a sampling batch answered each of its jobs itself."""
        budgets.set_current(jobs[0].budget)
        for job in jobs:  # each job's time budget counts from here, not from its arrival in the queue
            job.budget.start()
        try:
            jobs[0].budget.check()  # cancelled while queued
            if jobs[0].group is not None:
                batch = Batch(self, jobs)
                try:
                    self.batch_runner([j.item for j in jobs], batch)
                except Exception as exc:  # the batch failed: every job it had not answered fails with it
                    batch.fail_unanswered(exc)
                batch.fail_unanswered(RuntimeError("the sampling batch ended without answering this request"))
                return None
            return [jobs[0].run()]
        except Exception as exc:
            return [exc] * len(jobs)
        finally:
            budgets.set_current(None)

    @staticmethod
    def _replies(jobs: list[_Job], outcomes: list[Reply | Exception]) -> list[Reply]:
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

    def _reply(self, jobs: list[_Job], outcomes: list[Reply | Exception]) -> None:
        for job, (payload, media_type) in zip(jobs, self._replies(jobs, outcomes)):
            try:
                self.loop.call_soon_threadsafe(self._finish, job.request_id, payload, media_type)
            except RuntimeError:  # the event loop is closed: the server is gone, nobody polls any more
                pass

    def _loop(self) -> None:
        while True:
            jobs: list[_Job] = []
            try:
                with self._cond:
                    while not self._jobs and not self._stopped:
                        self._cond.wait()
                    if self._stopped:
                        return
                    jobs = self._next_jobs()
                    now = time.monotonic()
                    for job in jobs:
                        job.started = now
                    self._running, self._running_since = list(jobs), now
                outcomes = self._run(jobs)
                if outcomes is not None:
                    self._reply(jobs, outcomes)
            except Exception as exc:  # a fault outside any job (queue, replies): fail what was taken, go on
                log.error("engine queue fault: %s", "".join(traceback.format_exception(exc)))
                with self._cond:
                    taken = list(self._running) or jobs
                    self._jobs = [j for j in self._jobs if j not in taken]
                self._reply(taken, [exc] * len(taken))
            finally:
                self._running, self._running_since = [], None

    def _finish(self, request_id: str, payload: bytes, media_type: str) -> None:
        record = self.futures.get(request_id)
        if record is not None and not record.done.is_set():  # the first answer stands (see `stop`)
            record.payload, record.media_type = payload, media_type
            record.done.set()

    def stop(self, wait_s: float = 0.0) -> None:
        """Stop taking jobs, cancel the running one at its next step, and wait up to `wait_s` for the thread.

        Every open future is answered now, the running job's too: a step that cannot be interrupted (loading a
        model) must not keep long-polls, and with them the HTTP server's shutdown, waiting for it.
        """
        with self._cond:
            self._stopped = True
            for job in self._running:
                job.budget.cancel("cancelled: the server is shutting down")
            open_jobs, self._jobs = self._running + self._jobs, []
            self._reply(open_jobs, [budgets.JobInterrupted("the server is shutting down")] * len(open_jobs))
            self._cond.notify_all()
        self.join(wait_s)

    def join(self, wait_s: float) -> bool:
        """Wait up to `wait_s` for the engine thread to end; whether it has."""
        if wait_s > 0 and self._thread is not threading.current_thread():
            self._thread.join(wait_s)
        return not self._thread.is_alive()


