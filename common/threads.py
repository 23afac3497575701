"""Thread names the operating system sees: ``top -H``, ``/proc/<pid>/task/<tid>/comm`` and the
benchmarks' per-thread CPU then tell the render pool, the encoders, the microphone path and
the voice apart (Python before 3.14 leaves every thread named after the executable)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PR_SET_NAME = 15  # prctl(2)
_libc: ctypes.CDLL | None = None


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread's OS thread ``name`` (default: its Python name), cut to the 15
    bytes Linux keeps. Elsewhere, or if it fails, nothing changes."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    text = (name or threading.current_thread().name).encode("ascii", "replace")[:15]
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.prctl(PR_SET_NAME, ctypes.c_char_p(text), 0, 0, 0)
    except (OSError, AttributeError):
        return


@contextmanager
def os_thread_named(name: str) -> Iterator[None]:
    """The calling thread's OS name is ``name`` inside the ``with``, and what it was after.
    Threads a native library starts meanwhile (OpenVINO's inference streams) keep ``name``,
    so the benchmarks count the model's CPU apart from the thread that built it."""
    try:
        old: str | None = Path("/proc/thread-self/comm").read_text().strip()
    except OSError:
        old = None
    name_os_thread(name)
    try:
        yield
    finally:
        if old is not None:
            name_os_thread(old)


def foreground_thread() -> None:
    """Thread initializer: name the OS thread after the Python one, and give it the main
    thread's scheduling priority. A thread starts with the priority of the thread that made
    it, so a pool's worker made from a lowered thread (the render pool's: nice 10) would run
    lowered too. Where raising it back is not allowed, nothing changes."""
    name_os_thread()
    if not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       os.getpriority(os.PRIO_PROCESS, os.getpid()))
    except OSError:  # not permitted (no CAP_SYS_NICE): it stays as it was made
        return
