"""How long one engine job may run, and how it learns it was cancelled.

The clock starts when the engine starts the job, not when it is queued: a client that submits a whole study's
requests at once (`dpo-pairs` puts 640 samples in flight) waits its turn, and no queued job expires for the
time the ones ahead of it took. Queued jobs are bounded by number instead (the futures kept, the sessions).

Long jobs (decoding, many micro-batches) check their budget between steps, the only points where stopping
leaves nothing half-done: a `JobInterrupted` ends the job with a user error and the engine moves on. The worker
installs the running job's budget as the thread's current one; a sampling request carries its own, because
requests batched together keep separate deadlines and may be cancelled one by one.
"""

from __future__ import annotations

import threading
import time

from dpo_core.local.validation import UserError


class JobInterrupted(UserError):
    """The job ran past its time budget or was cancelled: reported to its client, never retried."""


class Budget:
    """A deadline plus a cancel flag, checked between the steps of a long job."""

    def __init__(self, seconds: float = float("inf")):
        self.seconds = seconds
        self.deadline: float | None = None  # set by start()
        self.cancelled = threading.Event()
        self.reason = "cancelled"

    def start(self) -> None:
        """The engine starts the job now; a second call (a job resumed by another step) keeps the first clock."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.seconds

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self.cancelled.set()

    def problem(self) -> str | None:
        """Why the job must stop now, or None."""
        if self.cancelled.is_set():
            return f"request {self.reason}"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return f"request ran past its time budget of {self.seconds:g} s (DPO_LOCAL_REQUEST_TIMEOUT_S)"
        return None

    def check(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise JobInterrupted(problem)


_current = threading.local()
UNLIMITED = Budget()


def current() -> Budget:
    """The budget of the job the calling (engine) thread is running; unlimited outside a job."""
    return getattr(_current, "budget", None) or UNLIMITED


def set_current(budget: Budget | None) -> None:
    _current.budget = budget
