"""Batched generation: concurrent Generate and GenerateStream requests share one forward pass per decoding step.

Each request becomes a ``Ticket`` submitted to the ``Batcher``. Its one worker
thread takes the oldest waiting tickets (at most ``max_batch``: those that
arrived while the previous batch ran join at once), waits at most ``wait``
seconds for more while RPC threads are still reading requests (``arriving``)
or the previous batch had several rows (requests that come one at a time do
not wait at all), and decodes them together
(``vlm.decoding.greedy_batch``): every row with its own version's edits
(``Bundle.attached(vlm, rows)``: rank-one deltas, key gates, dense deltas and
VisEdit adapters act on their rows of the batch only), the base model for rows
that ask for it. Greedy answers are those of the unbatched path, row by row.

* **Streaming stays per request**: each chosen token reaches its ticket's queue
  at once, and the RPC's thread turns tokens into text chunks.
* **A cancelled request leaves the batch**: ``Ticket.cancel`` (the RPC's
  termination callback) takes its row out at the next step, or out of the
  queue before it started.
* **One bad version fails only its own requests**: a batch that raises before
  any token was chosen is decoded again one row at a time, so the error reaches
  the requests it belongs to.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from vlm.decoding import DecodeRow, greedy_batch
from vlm.prompts import EncodedPrompt

from .bundles import Bundle
from .errors import JobCancelled, unavailable

log = logging.getLogger("editlens.server")

_END = object()


class Ticket:
    """A request waiting for, or in, a batch: its prompt, answer budget and version (``bundle``; ``None``:
    the base model). ``tokens()`` yields its answer tokens as they are chosen; ``answer()`` waits for all."""

    def __init__(self, prompt: EncodedPrompt, new_tokens: int, bundle: Bundle | None):
        self.prompt, self.new_tokens, self.bundle = prompt, new_tokens, bundle
        self.cancelled = threading.Event()
        self._events: queue.Queue = queue.Queue()
        self.emitted = 0

    def cancel(self) -> None:
        """Leave the batch at the next step (or never join one)."""
        self.cancelled.set()

    # called by the batcher's thread
    def _token(self, token: int) -> None:
        self.emitted += 1
        self._events.put(token)

    def _finish(self, error: BaseException | None = None) -> None:
        self._events.put(error if error is not None else _END)

    # called by the request's thread
    def tokens(self, poll: float = 0.25, active=lambda: True) -> Iterator[int]:
        """The answer tokens as they are chosen; raises the batch's error for this request. ``active()`` is
        asked every ``poll`` seconds while waiting: once False the ticket is cancelled and the iteration ends."""
        while True:
            try:
                item = self._events.get(timeout=poll)
            except queue.Empty:
                if not active():
                    self.cancel()
                    return
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def answer(self, active=lambda: True) -> list[int]:
        """Every answer token (waits for the end)."""
        return list(self.tokens(active=active))


class Batcher:
    """The worker thread that decodes waiting tickets in batches of at most ``max_batch``. Once a ticket
    waits, the batch waits at most ``wait`` seconds for more while requests are still *arriving* (inside
    ``arriving()``: being read and checked by their RPC threads) or the previous batch had several rows
    (clients are busy); otherwise it starts at once, so requests that come one at a time never wait.
    ``stats()``: batches and rows decoded so far."""

    def __init__(self, vlm, max_batch: int = 16, wait: float = 0.005, on_batch: Callable[[int], None] | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if wait < 0:
            raise ValueError("wait must be >= 0")
        self.vlm, self.max_batch, self.wait = vlm, max_batch, wait
        self.on_batch = on_batch  # called with each decoded batch's size (the metrics' histogram)
        self._cv = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._arriving = 0
        self._closed = False
        self._batches = self._rows = self._largest = self._last = 0
        self._thread = threading.Thread(target=self._work, name="editlens-batcher", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around reading a request up to its ``submit``: a batch being gathered waits for it (bounded)."""
        with self._cv:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cv:
                self._arriving -= 1
                self._cv.notify_all()

    def submit(self, prompt: EncodedPrompt, new_tokens: int, bundle: Bundle | None) -> Ticket:
        """Queue a request; its answer comes through the returned ticket."""
        ticket = Ticket(prompt, new_tokens, bundle)
        with self._cv:
            if self._closed:
                raise unavailable("the server is shutting down")
            self._waiting.append(ticket)
            self._cv.notify_all()
        return ticket

    @property
    def waiting(self) -> int:
        """Requests waiting for a batch (the queue depth)."""
        with self._cv:
            return len(self._waiting)

    def stats(self) -> dict[str, float]:
        """Batches decoded, rows decoded, the mean and largest batch."""
        with self._cv:
            return {
                "batches": self._batches,
                "rows": self._rows,
                "mean_batch": round(self._rows / self._batches, 3) if self._batches else 0.0,
                "largest_batch": self._largest,
            }

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the running batch; tickets still waiting are answered UNAVAILABLE."""
        with self._cv:
            self._closed = True
            left, self._waiting = list(self._waiting), deque()
            self._cv.notify_all()
        for t in left:
            t._finish(unavailable("the server is shutting down"))
        self._thread.join(timeout)

    # ------------------------------------------------------------ the worker
    def _gather(self) -> list[Ticket] | None:
        """The next batch (up to ``max_batch`` of the oldest tickets), once the requests arriving have been
        submitted or ``wait`` has passed; None once closed."""
        with self._cv:
            while not self._waiting and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            deadline = time.perf_counter() + self.wait
            while len(self._waiting) < self.max_batch and (self._arriving > 0 or self._last > 1) and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            if self._closed:
                return None
            n = min(len(self._waiting), self.max_batch)
            self._last = n
            return [self._waiting.popleft() for _ in range(n)]

    def _work(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            live = []
            for t in batch:
                if t.cancelled.is_set():
                    t._finish(JobCancelled("the client went away"))
                else:
                    live.append(t)
            if live:
                self._decode(live)

    def _decode(self, batch: list[Ticket]) -> None:
        bundles = {id(t.bundle): t.bundle for t in batch if t.bundle is not None}
        rows = [
            DecodeRow(
                t.prompt,
                t.new_tokens,
                group=None if t.bundle is None else id(t.bundle),
                on_token=t._token,
                cancelled=t.cancelled.is_set,
            )
            for t in batch
        ]
        try:
            greedy_batch(self.vlm, rows, lambda group, sel: bundles[group].attached(self.vlm, rows=sel))
        except Exception as exc:  # reported to the requests; the worker keeps serving
            if len(batch) > 1 and not any(t.emitted for t in batch):
                log.info(
                    "a batch of %d failed (%s: %s); decoding its rows one by one", len(batch), type(exc).__name__, exc
                )
                for t in batch:
                    self._decode([t])
                return
            for t in batch:
                t._finish(exc)
            return
        with self._cv:
            self._batches += 1
            self._rows += len(batch)
            self._largest = max(self._largest, len(batch))
        if self.on_batch is not None:
            self.on_batch(len(batch))
        for t in batch:
            t._finish()
