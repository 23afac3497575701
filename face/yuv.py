"""The picture format every room hands on: planar I420 frames (BT.601 limited range, what
WebRTC decoders assume), made from the renderer's RGB, and the clapper's flash frame."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

Yuv = npt.NDArray[np.uint8]  # (h * 3 // 2, w) uint8, planar I420, limited range

FLASH_LUMA = 235  # the flash frame is uniformly this bright (Y, 0..255)


def rgb_to_i420(rgb: npt.NDArray[np.uint8]) -> Yuv:
    """RGB (h, w, 3) uint8 -> I420 planes stacked as (h*3//2, w), BT.601 limited range
    (OpenCV's conversion is already limited range)."""
    return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420), dtype=np.uint8)


def flash_i420(width: int, height: int) -> Yuv:
    """The A/V sync test's white frame: luma FLASH_LUMA, neutral chroma."""
    yuv = np.full((height * 3 // 2, width), 128, dtype=np.uint8)
    yuv[:height] = FLASH_LUMA
    return yuv
