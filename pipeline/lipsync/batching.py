"""Cross-session batching: one inference worker per device, fed by every live session.

Sessions submit single frames from the event loop; the worker thread takes the first waiting
item, then keeps collecting until it has ``max_batch`` items or ``max_wait_s`` has passed since
the first one, and runs the model once for the whole batch. When the worker is busy, items
queue up and the next batch is taken at once without waiting, so under load batches fill by
themselves and N sessions cost far less than N separate model calls.
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
            "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
        }


class BatchWorker(Generic[I, O]):
    """Runs ``fn(items) -> outputs`` (same length, same order) on one thread, in batches.

    ``submit`` is safe from any thread; ``run`` awaits from an event loop and cancelling the
    awaiting task drops the item if the worker has not started it yet."""

    def __init__(
        self,
        fn: Callable[[Sequence[I]], Sequence[O]],
        *,
        max_batch: int,
        max_wait_s: float,
        name: str = "batch-worker",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self._queue: deque[tuple[I, Future[O]]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.stats = BatchStats()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def submit(self, item: I) -> Future[O]:
        fut: Future[O] = Future()
        with self._cond:
            if self._closed:
                fut.set_exception(WorkerClosed("the inference worker is closed"))
                return fut
            self._queue.append((item, fut))
            self.stats.max_queue = max(self.stats.max_queue, len(self._queue))
            self._cond.notify()
        return fut

    async def run(self, item: I) -> O:
        return await asyncio.wrap_future(self.submit(item))

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop after the batch in progress; items still queued fail with ``WorkerClosed``."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for _, fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(WorkerClosed("the inference worker closed"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _take(self) -> list[tuple[I, Future[O]]] | None:
        """The next batch (None once closed): blocks for the first item, then waits at most
        ``max_wait_s`` for the batch to fill."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[tuple[I, Future[O]]] = []
            while self._queue and len(batch) < self.max_batch:
                item, fut = self._queue.popleft()
                if fut.set_running_or_notify_cancel():  # False: cancelled while queued
                    batch.append((item, fut))
                else:
                    self.stats.cancelled += 1
            return batch

    def _loop(self) -> None:
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
                logger.exception("batch of %d failed", len(batch))
                self.stats.failed_batches += 1
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            finally:
                self.stats.busy_s += time.perf_counter() - t0
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
            for (_, fut), out in zip(batch, outputs, strict=True):
                fut.set_result(out)
