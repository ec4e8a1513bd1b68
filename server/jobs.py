"""Long requests (edits, diagnostics, training) as jobs with streamed progress.

A ``JobRunner`` owns ``workers`` threads and a bounded queue: a job submitted
while ``max_queued`` jobs already wait is refused (RESOURCE_EXHAUSTED), so a
flood of edits cannot pile up unbounded work. Generation is not a job: it
runs in the RPC's own thread and keeps being served while a job runs (the
job's hooks are thread-scoped, see ``vlm.hooks``). Mutating jobs of one
adapter hold that adapter's lock, so they run one at a time per adapter.

A job reports through ``emit`` (progress dicts) and ends with a result or an
exception; the RPC thread reads ``events`` and streams them. When the client
goes away the job is cancelled: a queued job never starts, a running one
stops at its next progress report (``JobCancelled``) before it registers
anything.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import JobCancelled, JobTimedOut, aborted, exhausted, unavailable

log = logging.getLogger("editlens.server")


@dataclass
class Job:
    """One submitted job: its function, its event queue (progress, then a result or an error), its state."""

    id: int
    kind: str
    fn: Callable[[Job], Any]
    adapter: str | None = None
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    accepted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"  # queued | running | done | failed | cancelled
    #: called once on cancel (the runner takes a queued job out of its queue count at once)
    on_cancel: Callable[[Job], None] | None = None
    #: when a running job must have ended (monotonic seconds; set when it starts): past it, it is stopped
    deadline: float | None = None
    peer: str = ""  # who asked (the client's address), for ListJobs
    #: its last progress report: (stage, step, steps)
    last: tuple[str, int, int] = ("queued", 0, 0)

    def emit(
        self,
        stage: str,
        step: int = 0,
        steps: int = 0,
        item: int = 0,
        items: int = 0,
        loss: float | None = None,
        message: str = "",
    ) -> None:
        """Report progress; raises JobCancelled once the client has gone, JobTimedOut past the deadline."""
        self.check_cancelled()
        self.last = (stage, step, steps)
        self.events.put(
            (
                "progress",
                {
                    "stage": stage,
                    "step": step,
                    "steps": steps,
                    "item": item,
                    "items": items,
                    "loss": loss,
                    "message": message,
                    "elapsed_seconds": time.monotonic() - self.accepted,
                },
            )
        )

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(f"{self.kind} job {self.id} was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.cancelled.set()
            raise JobTimedOut(
                f"{self.kind} job {self.id} ran past this server's limit (--max-job-seconds) and was stopped; "
                "nothing was registered"
            )

    def cancel(self) -> None:
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel(self)


class JobRunner:
    """Worker threads and a bounded queue of jobs; mutating jobs of one adapter run one at a time."""

    def __init__(
        self,
        workers: int = 1,
        max_queued: int = 8,
        max_seconds: float | None = None,
        ids: Iterator[int] | None = None,
    ):
        self.max_queued = max_queued
        self.max_seconds = max_seconds
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting: list[Job] = []
        self._running: dict[int, Job] = {}
        self._ids = ids if ids is not None else itertools.count(1)  # runners of one server share their numbers
        self._adapter_locks: dict[str, threading.Lock] = {}
        self._holders: dict[str, Job] = {}  # the job holding each adapter's lock
        self._lock_waiters: dict[str, int] = {}  # RPC threads waiting for each adapter's lock
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"editlens-job-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ status
    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._waiting)

    def jobs(self) -> list[Job]:
        """The queued and running jobs, oldest first."""
        with self._lock:
            return sorted([*self._waiting, *self._running.values()], key=lambda j: j.id)

    def find(self, job_id: int) -> Job | None:
        """The queued or running job with this id, if any."""
        return next((j for j in self.jobs() if j.id == job_id), None)

    def adapter_lock(self, adapter: str) -> threading.Lock:
        with self._lock:
            return self._adapter_locks.setdefault(adapter, threading.Lock())

    @contextmanager
    def holding(self, adapter: str, wait: float, what: str, waiters: int = 2) -> Iterator[None]:
        """Hold ``adapter``'s lock for a mutation outside a job (Rollback, SetAlias, DeleteVersion), waiting
        ``wait`` seconds at most: a running job of that adapter answers ABORTED, naming the job, instead of
        blocking an RPC thread until it ends; and at most ``waiters`` threads wait per adapter (more are refused
        at once), so mutations can never take every RPC thread from Generate and the health check."""
        lock = self.adapter_lock(adapter)
        with self._lock:
            queued = self._lock_waiters.get(adapter, 0)
            if queued >= waiters and lock.locked():
                raise aborted(f"{what} not done: {self._busy(adapter)}; {queued} call(s) already wait for it")
            self._lock_waiters[adapter] = queued + 1
        try:
            got = lock.acquire(timeout=wait)
        finally:
            with self._lock:
                self._lock_waiters[adapter] -= 1
        if not got:
            raise aborted(f"{what} not done: {self._busy(adapter)} (waited {wait:g} s); retry when it ends")
        try:
            yield
        finally:
            lock.release()

    def _busy(self, adapter: str) -> str:
        job = self._holders.get(adapter)
        if job is None:
            return f"adapter '{adapter}' is busy with another mutation"
        since = time.monotonic() - job.accepted
        return f"adapter '{adapter}' is busy: {job.kind} job {job.id} (accepted {since:.0f} s ago)"

    # ------------------------------------------------------------ submit
    def submit(
        self, kind: str, fn: Callable[[Job], Any], adapter: str | None = None, peer: str = ""
    ) -> tuple[Job, int]:
        """Queue a job; returns it and how many jobs are ahead of it. RESOURCE_EXHAUSTED when full."""
        with self._lock:
            if self._closed:
                raise unavailable("the server is shutting down")
            busy = len(self._running) >= len(self._threads)
            if busy and len(self._waiting) >= self.max_queued:
                raise exhausted(
                    f"the job queue is full ({len(self._waiting)} job(s) waiting, "
                    f"{len(self._running)} running; limit {self.max_queued}); try again later"
                )
            job = Job(next(self._ids), kind, fn, adapter, on_cancel=self._forget, peer=peer)
            ahead = len(self._waiting) + len(self._running)
            self._waiting.append(job)
        self._queue.put(job)
        return job, ahead

    def _forget(self, job: Job) -> None:
        """A cancelled job that has not started no longer counts against the queue (it is skipped when a
        worker reaches it)."""
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job in self._waiting:
                    self._waiting.remove(job)
                if job.cancelled.is_set():
                    job.state = "cancelled"
                    job.events.put(("error", JobCancelled(f"{job.kind} job {job.id} was cancelled before it ran")))
                    continue
                self._running[job.id] = job
            job.state = "running"
            if self.max_seconds is not None:
                job.deadline = time.monotonic() + self.max_seconds
            try:
                if job.adapter is not None:
                    with self.adapter_lock(job.adapter):
                        self._holders[job.adapter] = job
                        try:
                            result = job.fn(job)
                        finally:
                            self._holders.pop(job.adapter, None)
                else:
                    result = job.fn(job)
                job.state = "done"
                job.events.put(("result", result))
            except BaseException as exc:
                job.state = "cancelled" if isinstance(exc, JobCancelled) else "failed"
                if not isinstance(exc, Exception):
                    exc = RuntimeError(f"the job stopped: {type(exc).__name__}")
                job.events.put(("error", exc))
            finally:
                with self._lock:
                    self._running.pop(job.id, None)

    def close(self) -> None:
        """Refuse new jobs and cancel every queued and running one (a running job stops at its next progress
        report; one past its last cancellation point, registering a version, finishes)."""
        with self._lock:
            self._closed = True
            jobs = list(self._waiting) + list(self._running.values())
        for job in jobs:
            job.cancel()
        for _ in self._threads:
            self._queue.put(None)


def follow(job: Job, context, poll: float = 0.25):
    """Yield ("progress", dict) events of ``job`` until its end; returns its result or raises its error.

    Cancels the job when the RPC ends early (client cancelled or disconnected)."""
    context.add_callback(job.cancel)  # runs when the RPC terminates, however it terminates
    while True:
        try:
            kind, payload = job.events.get(timeout=poll)
        except queue.Empty:
            if not context.is_active():
                job.cancel()
                raise JobCancelled(f"the client went away; {job.kind} job {job.id} cancelled") from None
            continue
        if kind == "progress":
            yield payload
        elif kind == "result":
            return payload
        else:
            raise payload
