"""What the Wav2Lip network takes and gives back, without the network: the mel window of each
video frame, the 96x96 face crop and its input tensor, the paste-back geometry and mask, and
each avatar's per-frame geometry (``AvatarFaces``). Light to import (no model runtime)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import numpy.typing as npt

from avatars.quality import face_box_from_landmarks
from pipeline.lipsync.mel import mel_windows, to_wav2lip_audio, wav2lip_mel

if TYPE_CHECKING:
    from face import FaceRenderer

FACE_SIZE = 96  # Wav2Lip's input and output side

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


# --------------------------------------------------------------------------- audio side


@dataclass(frozen=True, slots=True)
class MelTrack:
    """A segment's mel windows, one (80, 16) window per video frame (``LipTrack``)."""

    windows: F32  # (n_frames, 80, 16)
    level: F32  # (n_frames,) 0..1 voice level, for metrics and tests

    @property
    def n_frames(self) -> int:
        return int(self.windows.shape[0])

    def at(self, j: int) -> F32:
        return self.windows[min(max(j, 0), self.n_frames - 1)]

    def openness(self) -> F32:
        return self.level


def _frame_levels(pcm: npt.NDArray[np.int16], sample_rate: int, fps: int, n: int) -> F32:
    """Per-frame voice level 0..1 (RMS from -42 to -14 dBFS)."""
    x = pcm.astype(np.float32) / 32768.0
    out = np.zeros(n, np.float32)
    for j in range(n):
        w = x[j * sample_rate // fps : (j + 1) * sample_rate // fps]
        if w.size:
            db = 20.0 * math.log10(max(float(np.sqrt(np.mean(w * w))), 1e-6))
            out[j] = min(max((db + 42.0) / 28.0, 0.0), 1.0)
    return out


def mel_track(pcm: npt.NDArray[np.int16], sample_rate: int, fps: int) -> MelTrack:
    """The mel windows for every video frame covering ``pcm`` (int16 mono)."""
    n_frames = max(1, -(-len(pcm) * fps // sample_rate))
    mel = wav2lip_mel(to_wav2lip_audio(pcm, sample_rate))
    windows = mel_windows(mel, n_frames, fps).astype(np.float32, copy=False)
    return MelTrack(windows=windows, level=_frame_levels(pcm, sample_rate, fps, n_frames))


# --------------------------------------------------------------------------- face side


_ROWS_RAMP = 4.0  # rows of the 96 over which the mask fades in below a model's exact rows


@dataclass(frozen=True, slots=True)
class FaceGeometry:
    """Where Wav2Lip works on one avatar frame: an integer square ``box`` (x0, y0, side) inside
    the frame, and the feathered lower-face ``mask`` (side x side, 0..1) it pastes through."""

    x0: int
    y0: int
    side: int
    mask: F32
    # rows and columns of the box (r0, r1, c0, c1) outside which the mask is 0: all the
    # paste changes (for a lower-rows model, about the lower half)
    blend: tuple[int, int, int, int]

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.side), slice(self.x0, self.x0 + self.side)


def face_geometry(
    landmarks: npt.ArrayLike, width: int, height: int, *, exact_from: int = 0
) -> FaceGeometry:
    """The paste box and mask for 68 landmarks (dlib order) in a ``width`` x ``height`` frame.

    The box is the square around the same landmark face box registration uses (cached crops are
    cut from it too), clamped into the frame. The mask covers the jaw, mouth, cheeks and nose
    tip (landmarks 2-14 and the nose), grown a little and feathered inwards, so it is exactly 0
    on the box's border and above the nose (eyes untouched).

    ``exact_from``: the first row of the 96x96 prediction the model computes exactly
    (``pipeline.lipsync.rows``; 0 = all of it). The mask is then also exactly 0 wherever the
    paste's bicubic resize would read a row above it, and fades in over ``_ROWS_RAMP`` rows
    below that (for the default avatar this touches only the faint top of the feathering:
    alpha <= 0.23, 1.3 % of the mask's weight)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    bx0, by0, bx1, by1 = face_box_from_landmarks(lm)
    side = int(round(max(bx1 - bx0, by1 - by0)))
    side = max(FACE_SIZE // 2, min(side, width, height))
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    x0 = int(round(min(max(cx - side / 2, 0), width - side)))
    y0 = int(round(min(max(cy - side / 2, 0), height - side)))
    pts = lm[[*range(2, 15), 35, 30, 31]] - np.array([x0, y0])
    mask = np.zeros((side, side), np.uint8)
    hull = cv2.convexHull(np.round(pts * 16).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA, shift=4)
    feather = max(2.0, side / 24)
    grow = max(1, int(round(side / 40)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
    grown = np.asarray(cv2.dilate(mask, kernel), dtype=np.float32)
    soft = cv2.GaussianBlur(grown / 255.0, (0, 0), feather)
    # keep it inside the box: fade smoothly to 0 towards the border (the chin often lies
    # close to the box's bottom edge)
    idx = np.arange(side, dtype=np.float32)
    edge = np.minimum(idx, side - 1 - idx)
    dist = np.minimum(edge[:, None], edge[None, :])
    ramp = np.clip(dist / (2.0 * feather), 0.0, 1.0)
    inner = ramp * ramp * (3.0 - 2.0 * ramp)
    if exact_from > 0:
        # cv2's bicubic resize reads rows floor(u) - 1 .. floor(u) + 2 of the 96 for output
        # row y, u = (y + 0.5) * 96 / side - 0.5: keep u >= exact_from + 1
        u = (idx + 0.5) * (FACE_SIZE / side) - 0.5
        fade = np.clip((u - (exact_from + 1)) / _ROWS_RAMP, 0.0, 1.0)
        inner = inner * (fade * fade * (3.0 - 2.0 * fade))[:, None]
    out = (soft * inner).astype(np.float32)
    out[out < 1.0 / 512] = 0.0  # what rounds to "no change" is exactly no change
    out.setflags(write=False)
    rows, cols = np.nonzero(out.any(axis=1))[0], np.nonzero(out.any(axis=0))[0]
    blend = (0, 0, 0, 0) if rows.size == 0 else (
        int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
    return FaceGeometry(x0=x0, y0=y0, side=side, mask=out, blend=blend)


def crop_face(rgb: U8, geo: FaceGeometry) -> U8:
    """The box resized to 96x96, BGR (the channel order Wav2Lip was trained on)."""
    ys, xs = geo.slices
    crop = rgb[ys, xs]
    interp = cv2.INTER_AREA if geo.side > FACE_SIZE else cv2.INTER_CUBIC
    small = cv2.resize(crop, (FACE_SIZE, FACE_SIZE), interpolation=interp)
    return np.ascontiguousarray(small[..., ::-1])


def model_input(face_bgr: U8) -> F32:
    """(6, 96, 96) float32: the face with its lower half blanked, then the face, /255. The
    reference half is scaled straight into place, then copied and blanked (0.11 ms a frame
    with the crop, against 0.20 building both halves and joining them)."""
    out = np.empty((6, FACE_SIZE, FACE_SIZE), np.float32)
    np.multiply(face_bgr.transpose(2, 0, 1), np.float32(1.0 / 255.0), out=out[3:])
    out[:3] = out[3:]
    out[:3, FACE_SIZE // 2 :] = 0.0
    return out


def paste(rgb: U8, pred_bgr: F32, geo: FaceGeometry, weight: float, *, copy: bool = True) -> U8:
    """``rgb`` with the prediction ((3, 96, 96) BGR 0..1, or its lowest rows (3, h, 96) from
    a lower-rows model) blended into the box through the mask times ``weight``; pixels where
    that is 0 keep their exact values. Returns a new array, or ``rgb`` itself changed in place
    with ``copy=False``."""
    out = rgb.copy() if copy else rgb
    if weight <= 0.0:
        return out
    missing = FACE_SIZE - pred_bgr.shape[1]
    if missing > 0:  # rows the model did not compute: the mask is 0 wherever they would count
        pred_bgr = np.concatenate(
            [np.zeros((3, missing, FACE_SIZE), pred_bgr.dtype), pred_bgr], axis=1
        )
    pred = np.clip(pred_bgr.transpose(1, 2, 0)[..., ::-1] * 255.0, 0.0, 255.0)
    big = cv2.resize(
        np.ascontiguousarray(pred), (geo.side, geo.side), interpolation=cv2.INTER_CUBIC
    )
    # only where the mask is not 0 (elsewhere the blend gives the pixel back as it was)
    r0, r1, c0, c1 = geo.blend
    alpha = (geo.mask[r0:r1, c0:c1] * np.float32(min(weight, 1.0)))[..., None]
    ys = slice(geo.y0 + r0, geo.y0 + r1)
    xs = slice(geo.x0 + c0, geo.x0 + c1)
    region = out[ys, xs].astype(np.float32)
    blended = region + alpha * (big[r0:r1, c0:c1] - region)
    out[ys, xs] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return out


class AvatarFaces:
    """Paste geometry per avatar frame (one for a still avatar, one per loop frame), computed
    once per loaded avatar and shared by its sessions. ``exact_from``: the model's first exact
    row (``OutputRows.exact_from``), which the masks stay below."""

    def __init__(self, face: FaceRenderer, exact_from: int = 0) -> None:
        avatar = face.avatar
        w, h = avatar.size
        self._face = face
        self.still = face_geometry(avatar.landmarks, w, h, exact_from=exact_from)
        self._per_frame = [
            face_geometry(lm, w, h, exact_from=exact_from) for lm in avatar.loop_landmarks
        ]

    def at(self, t_ns: int) -> FaceGeometry:
        if not self._per_frame:
            return self.still
        return self._per_frame[self._face.loop_index(t_ns)]


# --------------------------------------------------------------------------- the model


