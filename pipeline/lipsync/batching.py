"""Cross-session batching: one inference worker per device, fed by every live session.

Sessions submit single frames from the event loop; the worker thread takes the first waiting
item, then keeps collecting until it has ``max_batch`` items or ``max_wait_s`` has passed since
the first one, and runs the model once for the whole batch. When the worker is busy, items
queue up and the next batch is taken at once without waiting, so under load batches fill by
themselves and N sessions cost far less than N separate model calls.

A caller that will submit an item soon (it is still preparing it) can ``announce`` it: a
batch being filled then waits for announced items up to ``max_hold_s`` instead of
``max_wait_s``, so frames prepared in parallel on different threads (a call's frame group)
still meet in one batch; on a CPU two frames at once cost about a fifth less each than one.

With ``workers`` > 1, that many threads take batches from the one queue and run them at the
same time (one per parallel inference request of the runtime: OpenVINO streams on a CPU).
Each item wakes only the thread that needs it: the one filling a batch, or one idle thread
when nobody is filling or the queue holds more than the fillers will take. (Waking every
thread at each item cost a Wav2Lip call about 6 thread switches a frame with 2 workers: the
idle one woke, found the batch taken and went back to sleep.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from common.errors import LipSyncUnavailable
from common.threads import name_os_thread

logger = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - item
O = TypeVar("O")  # noqa: E741 - output


class WorkerClosed(RuntimeError):
    """The batch worker was closed before it ran the item."""


@dataclass(slots=True)
class BatchStats:
    batches: int = 0
    items: int = 0
    cancelled: int = 0
    failed_batches: int = 0
    busy_s: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches
    max_queue: int = 0
    wakeups: int = 0  # times a worker thread woke from waiting (an item, a timeout, close)

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch": round(self.mean_batch, 2),
            "cancelled": self.cancelled,
            "failed_batches": self.failed_batches,
            "busy_s": round(self.busy_s, 3),
            "max_queue": self.max_queue,
            "wakeups": self.wakeups,
            "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
        }


class BatchWorker(Generic[I, O]):
    """Runs ``fn(items) -> outputs`` (same length, same order) on ``workers`` threads, in
    batches (``fn`` must be safe to call from that many threads at once).

    ``submit`` is safe from any thread; ``run`` awaits from an event loop and cancelling the
    awaiting task drops the item if the worker has not started it yet."""

    def __init__(
        self,
        fn: Callable[[Sequence[I]], Sequence[O]],
        *,
        max_batch: int,
        max_wait_s: float,
        name: str = "batch-worker",
        workers: int = 1,
        max_hold_s: float = 0.02,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self.max_hold_s = max(self.max_wait_s, max_hold_s)
        self._coming = 0  # announced items not submitted yet
        self._queue: deque[tuple[I, Future[O]]] = deque()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # threads waiting for a first item
        self._fill = threading.Condition(self._lock)  # threads filling a batch
        self._idle_waiting = 0
        self._waking = 0  # idle threads notified that have not taken the lock yet
        self._filling = 0
        self._closed = False
        self.stats = BatchStats()
        self._threads = [
            threading.Thread(
                target=self._loop, name=name if workers == 1 else f"{name}-{i}", daemon=True
            )
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def announce(self) -> None:
        """An item is on its way: batches being filled wait for it (up to ``max_hold_s``).
        Follow with ``submit(item, announced=True)``, or ``withdraw()`` if it never comes."""
        with self._lock:
            self._coming += 1

    def withdraw(self) -> None:
        """An announced item will not come after all."""
        with self._lock:
            self._coming = max(0, self._coming - 1)
            self._fill.notify_all()  # a batch held for it may be taken now

    def submit(self, item: I, *, announced: bool = False) -> Future[O]:
        fut: Future[O] = Future()
        with self._lock:
            if announced:
                self._coming = max(0, self._coming - 1)
            if self._closed:
                fut.set_exception(WorkerClosed("the inference worker is closed"))
                return fut
            self._queue.append((item, fut))
            self.stats.max_queue = max(self.stats.max_queue, len(self._queue))
            if self._filling:
                self._fill.notify_all()
            self._spread()
        return fut

    def _spread(self) -> None:
        """(lock held) Wake one idle thread if the queue holds more than the threads filling
        batches, or already woken to, will take."""
        if (len(self._queue) > (self._filling + self._waking) * self.max_batch
                and self._idle_waiting > self._waking):
            self._waking += 1
            self._idle.notify()

    async def run(self, item: I, *, announced: bool = False) -> O:
        return await asyncio.wrap_future(self.submit(item, announced=announced))

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop after the batch in progress; items still queued fail with ``WorkerClosed``."""
        with self._lock:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._idle.notify_all()
            self._fill.notify_all()
        for _, fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(WorkerClosed("the inference worker closed"))
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _take(self) -> list[tuple[I, Future[O]]] | None:
        """The next batch (None once closed): blocks for the first item, then waits at most
        ``max_wait_s`` for the batch to fill, or ``max_hold_s`` while announced items are
        still coming."""
        with self._lock:
            while True:
                while not self._queue and not self._closed:
                    self._idle_waiting += 1
                    self._idle.wait()
                    self.stats.wakeups += 1
                    self._idle_waiting -= 1
                    self._waking = max(0, self._waking - 1)
                if self._closed:
                    return None
                start = time.monotonic()
                self._filling += 1
                while self._queue and len(self._queue) < self.max_batch and not self._closed:
                    limit = self.max_hold_s if self._coming else self.max_wait_s
                    left = start + limit - time.monotonic()
                    if left <= 0:
                        break
                    self._fill.wait(left)
                    self.stats.wakeups += 1
                self._filling -= 1
                if self._closed:
                    return None
                if self._queue:  # else another thread took them: wait for the next
                    break
            batch: list[tuple[I, Future[O]]] = []
            while self._queue and len(batch) < self.max_batch:
                item, fut = self._queue.popleft()
                if fut.set_running_or_notify_cancel():  # False: cancelled while queued
                    batch.append((item, fut))
                else:
                    self.stats.cancelled += 1
            self._spread()  # what is left over goes to another thread
            return batch

    def _loop(self) -> None:
        name_os_thread()
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                outputs = self._fn([item for item, _ in batch])
                if len(outputs) != len(batch):
                    raise RuntimeError(f"model gave {len(outputs)} outputs for {len(batch)} items")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                if isinstance(exc, LipSyncUnavailable):  # the pool is away: its calls degrade
                    logger.warning("batch of %d not run: %s", len(batch), exc)
                else:
                    logger.exception("batch of %d failed", len(batch))
                with self._lock:
                    self.stats.failed_batches += 1
                    self.stats.busy_s += time.perf_counter() - t0
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            with self._lock:
                self.stats.busy_s += time.perf_counter() - t0
                self.stats.batches += 1
                self.stats.items += len(batch)
                self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
            for (_, fut), out in zip(batch, outputs, strict=True):
                fut.set_result(out)
