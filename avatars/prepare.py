"""Registration's slow half: decoded frames -> everything a call needs, computed once.

:func:`prepare_avatar` takes decoded media (an image, a video or an animated GIF) and a
:class:`~avatars.analysis.FaceAnalyzer` and returns a :class:`PreparedAvatar`: the seamless
idle loop, per-frame face boxes and 68 landmarks (smoothed over time), face crops for the
lip-sync model, feathered mouth/face masks and a thumbnail. It refuses unusable uploads with
:class:`~avatars.quality.RegistrationRefused` (HTTP 422, ``code`` says why).

Video analysis
    The first frame gets the full quality check (a refusal there is final); so do a few
    frames spread over the video (at 1/4, 1/2, 3/4 and the end; a face missing there is
    handled as below). The detector runs every ``detect_every`` frames (5); in between, the
    face is tracked: the last two frames' landmarks, extrapolated at constant velocity, give
    the box, and the analyzer's landmark model runs on every frame. A detection that finds no
    face (or none where the tracked face was) marks the frames since the last good detection
    as lost; lost runs up to ``max_gap_s`` (0.5 s) are filled by interpolating the
    neighbours, longer ones are refused (``no_face``). Landmarks are then smoothed along
    time with a Savitzky-Golay filter (quadratic, half-window ``smoothing_s`` = 0.16 s: 9
    frames at 25 fps; zero phase, halves white jitter, and unlike a Gaussian does not flatten
    real accelerating head motion), and the face boxes are derived from the smoothed
    landmarks, so neither jitters.

Seamless loop
    The last ``loop_crossfade_s`` (0.5 s) of the video is cross-faded into its start: with C
    cross-fade frames, the loop has N - C frames and loop frame i < C is
    ``(1 - a) * src[N - C + i] + a * src[i]`` with ``a = (i + 1) / (C + 1)``; landmarks are
    blended the same way. Played 0..N-C-1 cyclically, the step from the last loop frame to
    the first is an ordinary frame-to-frame step of the source. An image gives a 1-frame loop.

Crops and masks (``crop_size`` S, 96 for Wav2Lip)
    Wav2Lip crops the box of its face detector (forehead to chin, cheek to cheek) padded
    10 px below the chin, and resizes it to 96x96. The equivalent here, identical for every
    backend, is the landmark face box (:func:`avatars.quality.face_box_from_landmarks`: the
    landmarks' extent grown 10 % on each side, 30 % upwards for the forehead and 8 % under
    the chin) made square (side = its longer side, same centre):
    :func:`crop_square`. Crops are antialiased when they shrink and edge-replicated where the
    square leaves the frame. Masks (uint8 0..255, feathered with a Gaussian edge):
    mouth = the hull of landmarks 48-67 dilated by S/12 and feathered with σ = S/32;
    face = the hull of the jaw line (0-16) and brows (17-26), eroded by S/48 and feathered
    with σ = S/40.

Memory: loop frames from index C on are the source frame arrays themselves (not copies);
only the C blended frames are new. Nothing here is kept after the call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from avatars.analysis.base import (
    N_LANDMARKS,
    Box,
    DetectedFace,
    FaceAnalyzer,
    LandmarkTracker,
)
from avatars.media_output import make_thumbnail
from avatars.quality import (
    RegistrationRefused,
    assess_quality,
    check_quality,
    face_box_from_landmarks,
)

__all__ = [
    "MediaLike",
    "PreparedAvatar",
    "crop_square",
    "prepare_avatar",
]

Rgb = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Progress = Callable[[float], None]

_DEFAULT_FPS = 25.0  # for a video whose frame rate is unknown
# Share of the progress bar taken by the analysis (the rest: crops, masks, thumbnail).
_ANALYSIS_SHARE = 0.85
# A detection must overlap the tracked face this much (IoU) to continue the track.
_MIN_TRACK_IOU = 0.3
# A tracked box this far (IoU) from the box of the landmarks found in it is predicted again.
_REFINE_IOU = 0.8


class MediaLike(Protocol):
    """What :func:`prepare_avatar` reads from decoded media (``avatars.media_input``'s
    ``DecodedMedia`` fits): ``kind`` is "image", "video" or "gif"; ``frames`` HxWx3 uint8 RGB."""

    @property
    def kind(self) -> str: ...

    @property
    def frames(self) -> Sequence[Rgb]: ...

    @property
    def fps(self) -> float: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


@dataclass(frozen=True, slots=True, eq=False)
class PreparedAvatar:
    """Row i of every array belongs to loop frame i (see the module doc for the geometry).

    ``fps`` is the loop's frame rate (an image keeps its media's, usually 0.0; a video of
    unknown rate gets 25). ``boxes`` are landmark face boxes (x0, y0, x1, y1) in frame
    pixels; ``landmarks`` (N, 68, 2) pixel centres, dlib order; ``crops`` (N, S, S, 3) RGB
    of :attr:`crop_boxes`; masks (N, S, S) uint8 at crop size; ``quality`` the JSON-ready
    quality report."""

    frames: list[Rgb]
    fps: float
    boxes: F32
    landmarks: F32
    crops: npt.NDArray[np.uint8]
    mouth_masks: npt.NDArray[np.uint8]
    face_masks: npt.NDArray[np.uint8]
    thumbnail_jpeg: bytes
    quality: dict[str, Any] = field(default_factory=dict)

    @property
    def frame_count(self) -> int:
        return len(self.frames)

    @property
    def crop_size(self) -> int:
        return int(self.crops.shape[1])

    @property
    def crop_boxes(self) -> F32:
        """(N, 4) the square each crop was taken from, (x0, y0, x1, y1) frame pixels."""
        return np.array([crop_square(tuple(b)) for b in self.boxes], dtype=np.float32)


# --------------------------------------------------------------------------- geometry


def crop_square(box: Sequence[float]) -> Box:
    """The square crop region for a landmark face box: same centre, side = longer side."""
    x0, y0, x1, y1 = (float(v) for v in box)
    half = max(x1 - x0, y1 - y0) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (cx - half, cy - half, cx + half, cy + half)


def _landmark_bbox(lm: npt.ArrayLike) -> tuple[float, float, float, float]:
    pts = np.asarray(lm, dtype=np.float64)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _box_relation(box: Box, lm: npt.ArrayLike) -> tuple[float, float, float, float]:
    """The detector box's edges relative to the landmarks' extent (to track the box)."""
    lx0, ly0, lx1, ly1 = _landmark_bbox(lm)
    w, h = max(lx1 - lx0, 1e-3), max(ly1 - ly0, 1e-3)
    return ((box[0] - lx0) / w, (box[1] - ly0) / h, (box[2] - lx1) / w, (box[3] - ly1) / h)


def _apply_relation(rel: tuple[float, float, float, float], lm: npt.ArrayLike) -> Box:
    lx0, ly0, lx1, ly1 = _landmark_bbox(lm)
    w, h = lx1 - lx0, ly1 - ly0
    return (lx0 + rel[0] * w, ly0 + rel[1] * h, lx1 + rel[2] * w, ly1 + rel[3] * h)


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------- time series


def _savgol_rows(half: int, order: int) -> F64:
    """(2h+1, 2h+1) weights: row j evaluates, at offset j - h from the window centre, the
    least-squares polynomial of ``order`` through the window's 2h+1 samples."""
    t = np.arange(-half, half + 1, dtype=np.float64)
    vander = t[:, None] ** np.arange(order + 1)
    return np.asarray(vander @ np.linalg.pinv(vander), dtype=np.float64)


def _smooth(x: F64, half: int, order: int = 2) -> F64:
    """Savitzky-Golay smoothing along axis 0 (zero phase; quadratic trends - steady drift,
    acceleration - pass unbent). The first/last ``half`` samples are evaluated on the
    polynomial of the first/last full window rather than on padding."""
    n = x.shape[0]
    half = min(half, (n - 1) // 2)
    if half < 1 or 2 * half + 1 <= order:
        return x.copy()
    rows = _savgol_rows(half, order)
    w = 2 * half + 1
    centre = rows[half]
    out = np.zeros_like(x)
    for j, k in enumerate(centre):
        out[half : n - half] += k * x[j : n - w + 1 + j]
    head = np.tensordot(rows[:half], x[:w], axes=(1, 0))
    tail = np.tensordot(rows[half + 1 :], x[n - w :], axes=(1, 0))
    out[:half] = head
    out[n - half :] = tail
    return out


def _jitter_px(lms: F64) -> float:
    """Frame-to-frame jitter estimate: RMS third difference / sqrt(20), over all points and
    both axes: the std of white noise on a track; smooth motion (up to a steady
    acceleration) adds nothing."""
    if lms.shape[0] < 4:
        return 0.0
    d3 = lms[3:] - 3 * lms[2:-1] + 3 * lms[1:-2] - lms[:-3]
    return float(np.sqrt(np.mean(d3**2) / 20.0))


def _fill_gaps(lms: F64, found: npt.NDArray[np.bool_], fps: float, max_gap_s: float) -> int:
    """Interpolate lost frames in place from their neighbours; refuse gaps over max_gap_s.
    Returns how many frames were filled."""
    n = len(found)
    lost = np.flatnonzero(~found)
    if lost.size == 0:
        return 0
    max_gap = max(1, int(math.floor(max_gap_s * fps + 1e-9)))
    start = 0
    runs: list[tuple[int, int]] = []
    for k in range(1, lost.size + 1):
        if k == lost.size or lost[k] != lost[k - 1] + 1:
            runs.append((int(lost[start]), int(lost[k - 1]) + 1))
            start = k
    for a, b in runs:
        if b - a > max_gap:
            raise RegistrationRefused(
                "no_face",
                f"the face is lost for {(b - a) / fps:.1f} s (from {a / fps:.1f} s to "
                f"{b / fps:.1f} s); at most {max_gap_s:.1f} s can be bridged",
            )
    good = np.flatnonzero(found)
    flat = lms.reshape(n, -1)
    for col in range(flat.shape[1]):
        flat[lost, col] = np.interp(lost, good, flat[good, col])
    return int(lost.size)


# --------------------------------------------------------------------------- analysis


def _pick(faces: list[DetectedFace], predicted: Box | None) -> DetectedFace | None:
    if not faces:
        return None
    if predicted is None:
        return faces[0]
    best = max(faces, key=lambda f: _iou(f.box, predicted))
    return best if _iou(best.box, predicted) >= _MIN_TRACK_IOU else None


def _sample_frames(n: int, step: int) -> list[int]:
    """Detection frames spread over the video that get the quality checks (besides 0)."""
    picks = {step * int(round(n * q / step)) for q in (0.25, 0.5, 0.75)}
    picks.add(step * ((n - 1) // step))
    return sorted(i for i in picks if 0 < i < n)


def _analyse_video(
    frames: Sequence[Rgb],
    analyzer: FaceAnalyzer,
    *,
    fps: float,
    detect_every: int,
    max_gap_s: float,
    thresholds: Mapping[str, Any],
    progress: Progress | None,
) -> tuple[F64, dict[str, Any]]:
    n = len(frames)
    tracker = analyzer if isinstance(analyzer, LandmarkTracker) else None
    step = max(1, detect_every) if tracker is not None else 1
    samples = set(_sample_frames(n, step))
    lms = np.full((n, N_LANDMARKS, 2), np.nan, dtype=np.float64)
    found = np.zeros(n, dtype=bool)
    report: dict[str, Any] = {}
    rel: tuple[float, float, float, float] | None = None
    prev: F64 | None = None  # landmarks of frame i - 1 (None: not found)
    prev2: F64 | None = None  # ... of frame i - 2
    last_good = -1
    detections = 0
    for i, frame in enumerate(frames):
        if prev is None or rel is None or tracker is None or i % step == 0:
            faces = analyzer.detect(frame)
            detections += 1
            if i == 0:
                report = check_quality(frame, faces, backend=analyzer.name, **thresholds)
            elif i in samples and faces:
                _, failures = assess_quality(frame, faces, backend=analyzer.name, **thresholds)
                if failures:
                    code, detail = failures[0]
                    raise RegistrationRefused(code, f"at {i / fps:.1f} s: {detail}")
            predicted = None if prev is None or rel is None else _apply_relation(rel, prev)
            face = _pick(faces, predicted)
            if face is None:
                found[last_good + 1 : i + 1] = False  # tracked frames since then are suspect
                prev = prev2 = None
                if progress is not None:
                    progress(_ANALYSIS_SHARE * (i + 1) / n)
                continue
            lm = np.asarray(face.landmarks, dtype=np.float64)
            rel = _box_relation(face.box, lm)
            last_good = i
        else:
            # constant-velocity guess of where the face is now; once more on the result's
            # own box when the guess was poor (sudden motion)
            guess = prev if prev2 is None else 2.0 * prev - prev2
            box = _apply_relation(rel, guess)
            lm = np.asarray(tracker.landmarks_in_box(frame, box), dtype=np.float64)
            refined = _apply_relation(rel, lm)
            if _iou(box, refined) < _REFINE_IOU:
                lm = np.asarray(tracker.landmarks_in_box(frame, refined), dtype=np.float64)
        lms[i] = lm
        found[i] = True
        prev2, prev = prev, lm
        if progress is not None:
            progress(_ANALYSIS_SHARE * (i + 1) / n)
    filled = _fill_gaps(lms, found, fps, max_gap_s)
    report["video"] = {
        "frames_analysed": n,
        "detections": detections,
        "detect_every": step,
        "checked_frames": [0, *sorted(samples)],
        "filled_frames": filled,
    }
    return lms, report


# --------------------------------------------------------------------------- loop


def _crossfade_count(n: int, fps: float, crossfade_s: float) -> int:
    if n < 4 or crossfade_s <= 0:
        return 0
    return max(0, min(int(round(crossfade_s * fps)), (n - 1) // 3))


def _make_loop(frames: Sequence[Rgb], lms: F64, c: int) -> tuple[list[Rgb], F64]:
    n = len(frames)
    if c == 0:
        return list(frames), lms
    out_frames: list[Rgb] = []
    out_lms = lms[: n - c].copy()
    for i in range(c):
        a = (i + 1) / (c + 1)
        blended = cv2.addWeighted(frames[n - c + i], 1.0 - a, frames[i], a, 0.0)
        out_frames.append(np.asarray(blended, dtype=np.uint8))
        out_lms[i] = (1.0 - a) * lms[n - c + i] + a * lms[i]
    out_frames.extend(frames[c : n - c])
    return out_frames, out_lms


# --------------------------------------------------------------------------- crops, masks


def _crop(frame: Rgb, square: Box, size: int) -> Rgb:
    """``frame`` inside ``square`` resampled to size x size (pixel-centre exact)."""
    x0, y0, x1, _ = square
    side = x1 - x0
    k = size / side  # crop px per frame px
    h, w = frame.shape[:2]
    src = frame
    ox, oy, kx, ky = 0.0, 0.0, 1.0, 1.0  # src = (frame - o + 0.5) * k_ - 0.5
    if k < 1.0:  # shrink the region first with area averaging (antialiased), then warp
        ix0, iy0 = max(0, int(math.floor(x0)) - 2), max(0, int(math.floor(y0)) - 2)
        ix1 = min(w, int(math.ceil(x1)) + 2)
        iy1 = min(h, int(math.ceil(y0 + side)) + 2)
        if ix1 - ix0 >= 2 and iy1 - iy0 >= 2:
            rw = max(1, round((ix1 - ix0) * k))
            rh = max(1, round((iy1 - iy0) * k))
            src = np.asarray(
                cv2.resize(frame[iy0:iy1, ix0:ix1], (rw, rh), interpolation=cv2.INTER_AREA)
            )
            ox, oy, kx, ky = ix0, iy0, rw / (ix1 - ix0), rh / (iy1 - iy0)
    # crop pixel u -> frame x = x0 + (u + 0.5) / k - 0.5 -> src xs = (x - ox + 0.5) * kx - 0.5
    m = np.array(
        [
            [kx / k, 0.0, (x0 - ox + 0.5 / k) * kx - 0.5],
            [0.0, ky / k, (y0 - oy + 0.5 / k) * ky - 0.5],
        ]
    )
    out = cv2.warpAffine(
        src,
        m,
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return np.asarray(out, dtype=np.uint8)


def _to_crop(pts: F64, square: Box, size: int) -> F64:
    k = size / (square[2] - square[0])
    return (pts - np.array(square[:2]) + 0.5) * k - 0.5


def _feathered(pts: F64, size: int, *, grow: int, sigma: float) -> npt.NDArray[np.uint8]:
    mask = np.zeros((size, size), np.uint8)
    hull = cv2.convexHull(np.round(pts * 16).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA, shift=4)
    if grow:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * abs(grow) + 1,) * 2)
        op = cv2.dilate if grow > 0 else cv2.erode
        mask = np.asarray(op(mask, kernel))
    if sigma > 0:
        mask = np.asarray(cv2.GaussianBlur(mask, (0, 0), sigma))
    return mask


def _masks(crop_pts: F64, size: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    mouth = _feathered(crop_pts[48:68], size, grow=max(1, round(size / 12)), sigma=size / 32)
    face = _feathered(crop_pts[0:27], size, grow=-max(1, round(size / 48)), sigma=size / 40)
    return mouth, face


# --------------------------------------------------------------------------- entry point


def prepare_avatar(
    media: MediaLike,
    analyzer: FaceAnalyzer,
    *,
    crop_size: int = 96,
    loop_crossfade_s: float = 0.5,
    progress: Progress | None = None,
    detect_every: int = 5,
    smoothing_s: float = 0.16,
    max_gap_s: float = 0.5,
    quality_thresholds: Mapping[str, Any] | None = None,
) -> PreparedAvatar:
    """Analyse ``media`` with ``analyzer`` and build the avatar's loop, landmarks, crops,
    masks and thumbnail (see the module doc). ``progress(fraction)`` is called with values
    rising to 1.0 as work advances. ``quality_thresholds`` are keyword arguments of
    :func:`avatars.quality.check_quality`.

    Raises :class:`~avatars.quality.RegistrationRefused` (422) for an unusable face,
    ``ValueError`` for media without frames or a bad argument. CPU-bound and synchronous:
    call it from a worker thread or process, not the event loop."""
    frames = list(media.frames)
    if not frames:
        raise ValueError("the media has no frames")
    if crop_size < 16:
        raise ValueError(f"crop_size must be at least 16, got {crop_size}")
    for frame in frames:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frames must be HxWx3 uint8 RGB, got {frame.shape} {frame.dtype}")
    thresholds = dict(quality_thresholds or {})
    fps = float(media.fps) if math.isfinite(media.fps) and media.fps > 0 else 0.0
    if media.kind == "image" or len(frames) == 1:
        frames = frames[:1]
        faces = analyzer.detect(frames[0])
        quality = check_quality(frames[0], faces, backend=analyzer.name, **thresholds)
        lms = np.asarray(faces[0].landmarks, dtype=np.float64)[None]
        if progress is not None:
            progress(_ANALYSIS_SHARE)
        loop_frames, loop_lms = frames, lms
    else:
        fps = fps or _DEFAULT_FPS
        raw, quality = _analyse_video(
            frames,
            analyzer,
            fps=fps,
            detect_every=detect_every,
            max_gap_s=max_gap_s,
            thresholds=thresholds,
            progress=progress,
        )
        smoothed = _smooth(raw, max(1, round(smoothing_s * fps)))
        c = _crossfade_count(len(frames), fps, loop_crossfade_s)
        loop_frames, loop_lms = _make_loop(frames, smoothed, c)
        quality["video"].update(
            loop_frames=len(loop_frames),
            crossfade_frames=c,
            jitter_px={
                "raw": round(_jitter_px(raw), 3),
                "smoothed": round(_jitter_px(smoothed), 3),
            },
        )

    n = len(loop_frames)
    boxes = np.array([face_box_from_landmarks(lm) for lm in loop_lms], dtype=np.float64)
    crops = np.empty((n, crop_size, crop_size, 3), np.uint8)
    mouth = np.empty((n, crop_size, crop_size), np.uint8)
    face = np.empty((n, crop_size, crop_size), np.uint8)
    for i, (frame, lm, box) in enumerate(zip(loop_frames, loop_lms, boxes, strict=True)):
        square = crop_square(tuple(box))
        crops[i] = _crop(frame, square, crop_size)
        mouth[i], face[i] = _masks(_to_crop(lm, square, crop_size), crop_size)
        if progress is not None:
            progress(_ANALYSIS_SHARE + (0.99 - _ANALYSIS_SHARE) * (i + 1) / n)
    thumbnail = make_thumbnail(loop_frames[0])
    quality["crop_size"] = crop_size
    if progress is not None:
        progress(1.0)
    return PreparedAvatar(
        frames=loop_frames,
        fps=fps,
        boxes=boxes.astype(np.float32),
        landmarks=loop_lms.astype(np.float32),
        crops=crops,
        mouth_masks=mouth,
        face_masks=face,
        thumbnail_jpeg=thumbnail,
        quality=quality,
    )
