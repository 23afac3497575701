"""Shared pieces of the face rigs: array types, boxes and small easing curves."""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

NS_PER_S = 1_000_000_000

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
_A = TypeVar("_A", bound="np.ndarray[Any, Any]")
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
PATCH_INSET = 2  # rigs leave this many border pixels of their region unedited

def smoothstep(x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    return x * x * (3.0 - 2.0 * x)


def frozen(a: _A) -> _A:
    """Mark a precomputed array read-only (the renderer shares it between threads)."""
    a.setflags(write=False)
    return a


def roi_box(x0: float, y0: float, x1: float, y1: float, w: int, h: int) -> Box:
    return (
        max(0, int(math.floor(x0))),
        max(0, int(math.floor(y0))),
        min(w, int(math.ceil(x1)) + 1),
        min(h, int(math.ceil(y1)) + 1),
    )


def overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
