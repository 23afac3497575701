"""Thread names the operating system sees: ``top -H``, ``/proc/<pid>/task/<tid>/comm`` and the
benchmarks' per-thread CPU then tell the render pool, the encoders, the microphone path and
the voice apart (Python before 3.14 leaves every thread named after the executable)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

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
