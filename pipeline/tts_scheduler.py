"""One synthesis thread shared fairly: live calls round-robin, render jobs after them.

Each job is one bounded piece of work (one synthesis unit). A job carries an owner (a
session id, a render job) and a class, live or render. The thread takes the next job from
the live owner served longest ago (an owner never served, or forgotten, first), and a
render owner's job only when no live job waits; an owner's own jobs run in order. So a call
waits behind another owner's text for at most the job already running. Jobs are
``concurrent.futures.Future``s: cancelling a pending one drops it unrun, from any thread
or event loop. After a burst of work, once nothing has come for ``idle_s``, the thread
runs ``on_idle`` once (a voice gives its scratch memory back there).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from common.threads import name_os_thread

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

FORGET_AFTER = 256
"""An owner with nothing pending is forgotten once this many jobs ran since it was served
(its next job then counts as a newcomer's)."""


@dataclass
class _Owner:
    live: bool
    jobs: deque[tuple[int, Future[Any], Callable[[], Any]]] = field(default_factory=deque)
    served: int = -1  # sequence number of the last job taken; -1: never


class SynthesisScheduler:
    """Owns one worker thread (started on the first job) that runs submitted jobs one at
    a time, in the order described in the module docstring."""

    def __init__(
        self,
        *,
        thread_name: str = "piper",
        on_idle: Callable[[], None] | None = None,
        idle_s: float = 2.0,
    ) -> None:
        self._thread_name = thread_name
        self._on_idle = on_idle
        self._idle_s = idle_s
        self._worked = False  # a job ran since on_idle last ran
        self._cond = threading.Condition()
        self._owners: dict[Hashable, _Owner] = {}
        self._arrivals = itertools.count()
        self._served = 0  # jobs taken so far
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(
        self, fn: Callable[..., _T], *args: Any, owner: Hashable, live: bool = True
    ) -> Future[_T]:
        """Queue ``fn(*args)`` for ``owner``; live (a call) or not (a render job)."""
        fut: Future[_T] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the synthesis scheduler is closed")
            state = self._owners.get(owner)
            if state is None:
                state = self._owners[owner] = _Owner(live=live)
            state.live = live  # the latest submission says which class the owner is in
            state.jobs.append((next(self._arrivals), fut, lambda: fn(*args)))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name=self._thread_name, daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return fut

    def drop(self, owner: Hashable) -> int:
        """Cancel the pending jobs of ``owner``; returns how many were dropped."""
        with self._cond:
            state = self._owners.get(owner)
            if state is None:
                return 0
            dropped = sum(1 for _, fut, _ in state.jobs if fut.cancel())
            state.jobs.clear()
            return dropped

    def pending(self, owner: Hashable | None = None) -> int:
        """Jobs waiting (not cancelled), of ``owner`` or of everyone."""
        with self._cond:
            states = (
                self._owners.values() if owner is None else [self._owners.get(owner)]
            )
            return sum(
                1 for s in states if s is not None for _, f, _ in s.jobs if not f.cancelled()
            )

    def close(self, *, wait: bool = True) -> None:
        """Cancel every pending job and stop the thread after the job it is running."""
        with self._cond:
            self._closed = True
            for state in self._owners.values():
                for _, fut, _ in state.jobs:
                    fut.cancel()
                state.jobs.clear()
            self._cond.notify_all()
            thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    # --- the worker thread ------------------------------------------------------------------
    def _next(self) -> tuple[Future[Any] | None, Callable[[], Any]] | None:
        """The next job to run (called with the lock held), ``(None, on_idle)`` when it is
        time for that, None when the scheduler closes."""
        while True:
            if self._closed:
                return None
            best: tuple[bool, int, int] | None = None
            chosen: _Owner | None = None
            for owner, state in list(self._owners.items()):
                while state.jobs and state.jobs[0][1].cancelled():
                    state.jobs.popleft()
                if not state.jobs:
                    if self._served - state.served > FORGET_AFTER:
                        del self._owners[owner]
                    continue
                key = (not state.live, state.served, state.jobs[0][0])
                if best is None or key < best:
                    best, chosen = key, state
            if chosen is not None:
                _, fut, job = chosen.jobs.popleft()
                chosen.served = self._served
                self._served += 1
                self._worked = True
                return fut, job
            if self._worked and self._on_idle is not None:
                if not self._cond.wait(self._idle_s):  # nothing came: idle now
                    self._worked = False
                    return None, self._on_idle
            else:
                self._cond.wait()

    def _work(self) -> None:
        name_os_thread()
        while True:
            with self._cond:
                picked = self._next()
            if picked is None:
                return
            fut, job = picked
            if fut is None:
                try:
                    job()
                except Exception:  # noqa: BLE001 - housekeeping must not stop the thread
                    logger.warning("the synthesis thread's idle work failed", exc_info=True)
                continue
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = job()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(exc)
            else:
                fut.set_result(result)
