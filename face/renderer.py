"""``FaceRenderer``: an avatar drawn for a ``FacePose``.

It precomputes every mask, texture and map once per avatar; ``render()`` then only touches two
small eye regions and the mouth region, and runs one ``cv2.warpAffine`` over the whole frame.

Eye and mouth geometry come from the avatar's 68 dlib landmarks:
36-41 / 42-47 eyes (corner, upper lid x2, corner, lower lid x2), 17-21 / 22-26 brows,
48-59 outer lips, 60-67 inner lips, 0-16 jaw (8 = chin), 33 = nose base.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import cv2
import numpy as np
import numpy.typing as npt

from avatars.model import Avatar
from face.eyes import EyeRig
from face.geometry import NS_PER_S, PATCH_INSET, U8, Box, frozen, overlaps
from face.mouth import MouthRig
from face.timeline import FacePose, IdleTimeline, MouthShape
from face.yuv import Yuv, rgb_to_i420

LOOP_RIGS = 128  # loop-video avatars: mouth rigs kept (about 0.3 MB each at 512x512)
# whole-frame warps of the avatar image kept, by head matrix: the timeline holds the head pose
# for two frames (face.timeline.HEAD_STEP_NS), so every second frame of a call reuses one;
# a few per live call of the avatar (0.75 MB each at 512x512)
BASE_WARPS = 8
SPARE_WARPS = 2  # arrays of warps that left the cache, kept to be warped into again


@dataclass(eq=False, slots=True)
class _Base:
    """One cached warp of the avatar image and its I420; ``readers`` reading it now."""

    rgb: U8
    yuv: Yuv
    readers: int = 0
    retired: bool = False  # out of the cache
    recycled: bool = False  # its arrays were handed out to be warped into


class FaceRenderer:
    """Renders an avatar for a ``FacePose``. Thread-safe: all state is read-only after init."""

    def __init__(self, avatar: Avatar) -> None:
        self._avatar = avatar
        image = np.ascontiguousarray(avatar.image, dtype=np.uint8)
        self._image = frozen(image)
        self._h, self._w = image.shape[:2]
        lm = avatar.landmarks.astype(np.float64)
        self._eyes = (EyeRig(image, lm[36:42], lm[17:22]), EyeRig(image, lm[42:48], lm[22:27]))
        self._mouth = MouthRig(image, lm)
        face_h = float(lm[8, 1] - lm[17:27, 1].min())
        # head motion pivots at the neck, below the chin
        self._pivot = (float(lm[8, 0]), float(lm[8, 1] + 0.35 * face_h))
        self._loop = avatar.loop_frames
        self._loop_fps = avatar.loop_fps
        self._loop_cycle = avatar.loop_mode == "cycle"
        # mouth rigs of loop frames with their own landmarks, built on first use (only
        # speaking frames need one) and kept for the most recently used LOOP_RIGS frames (a
        # 30 s loop would otherwise hold 750 rigs); a race builds the same rig twice, harmlessly
        self._loop_mouths: OrderedDict[int, MouthRig] = OrderedDict()
        self._loop_lock = threading.Lock()
        self._warps: OrderedDict[bytes, _Base] = OrderedDict()
        self._spare: list[tuple[U8, Yuv]] = []  # arrays of retired warps, to warp into
        self._image_yuv = frozen(rgb_to_i420(image)) if not avatar.loop_frames else None
        self._warps_lock = threading.Lock()
        self.warp_hits = 0
        self.warp_misses = 0

    @property
    def avatar(self) -> Avatar:
        return self._avatar

    @property
    def mouth_box(self) -> Box:
        """The region the speaking mouth is drawn in (image coordinates, before the warp)."""
        return self._mouth.box

    def _loop_mouth(self, i: int) -> MouthRig:
        """The mouth rig for loop frame ``i``: its own landmarks when the avatar has them."""
        lms = self._avatar.loop_landmarks
        if not lms:
            return self._mouth
        with self._loop_lock:
            rig = self._loop_mouths.get(i)
            if rig is not None:
                self._loop_mouths.move_to_end(i)
                return rig
        rig = MouthRig(self._loop[i], lms[i].astype(np.float64))
        with self._loop_lock:
            self._loop_mouths[i] = rig
            while len(self._loop_mouths) > LOOP_RIGS:
                self._loop_mouths.popitem(last=False)
        return rig

    def loop_index(self, t_ns: int) -> int:
        """Loop frame shown at ``t_ns``: ping-pong 0, 1, .., n-1, n-2, .., 1, 0, 1, ..., or for
        a seamless (``cycle``) loop 0, 1, .., n-1, 0, 1, ..."""
        n = len(self._loop)
        if n <= 1:
            return 0
        i = int(math.floor(max(t_ns, 0) * self._loop_fps / NS_PER_S))
        if self._loop_cycle:
            return i % n
        i %= 2 * (n - 1)
        return i if i < n else 2 * (n - 1) - i

    def head_matrix(self, pose: FacePose) -> npt.NDArray[np.float64] | None:
        """The frame's affine warp for the pose, or None when it is the identity."""
        if (
            abs(pose.head_dx) < 1e-3
            and abs(pose.head_dy) < 1e-3
            and abs(pose.head_roll_deg) < 1e-4
            and abs(pose.head_scale - 1.0) < 1e-6
        ):
            return None
        m = cv2.getRotationMatrix2D(self._pivot, pose.head_roll_deg, pose.head_scale)
        m[0, 2] += pose.head_dx
        m[1, 2] += pose.head_dy
        return np.asarray(m, dtype=np.float64)

    def _patches(self, pose: FacePose) -> list[tuple[Box, U8]]:
        """Changed regions of the avatar image (source coordinates) for this pose."""
        out: list[tuple[Box, U8]] = []
        for eye in self._eyes:
            p = eye.patch(pose.gaze_x, pose.gaze_y, pose.blink)
            if p is not None:
                out.append((eye.box, p))
        p = self._mouth.patch(self._image, pose.mouth_shape())
        if p is not None:
            out.append((self._mouth.box, p))
        return out

    def frame_i420(
        self, timeline: IdleTimeline, t_ns: int, mouth: MouthShape | None = None
    ) -> Yuv:
        """The I420 frame at media time ``t_ns``: the timeline's pose, with ``mouth`` (a
        speaking mouth) in place of the idle one when given. One call for a frame, so a
        lip-sync engine hands the whole drawing to this room."""
        pose = timeline.pose_at(t_ns)
        if mouth is not None:
            pose = replace(pose, mouth=mouth)
        return self.render_i420(pose)

    def render_i420(self, pose: FacePose) -> Yuv:
        """``rgb_to_i420(render(pose))``, equal to the last bit, drawn without a whole RGB
        frame: the I420 of the (warped) avatar image is kept with its warp, copied, and only
        the changed regions (eyes, mouth) are converted and written into its planes, each
        widened to even coordinates so that its 2x2 chroma blocks are whole."""
        m = None if self._loop else self.head_matrix(pose)
        if self._loop or (m is not None and abs(pose.head_roll_deg) > 10.0):
            return rgb_to_i420(self.render(pose))
        patches = self._patches(pose)
        if m is None:
            placed = [(box, p) for box, p in patches]
        else:
            placed = [r for box, p in patches if (r := self._placed_patch(p, box, m)) is not None]
        regions = [_even(box, self._w, self._h) for box, _ in placed]
        if any(overlaps(a, b) for i, a in enumerate(regions) for b in regions[i + 1 :]) or (
            m is not None
            and any(overlaps(a[0], b[0]) for i, a in enumerate(patches) for b in patches[i + 1 :])
        ):
            return rgb_to_i420(self.render(pose))
        with self._base(m) as (base_rgb, base_yuv):
            out = base_yuv.copy()
            regions_rgb = [base_rgb[ey0:ey1, ex0:ex1].copy() for ex0, ey0, ex1, ey1 in regions]
        planes = _planes(out, self._w, self._h)
        for ((x0, y0, x1, y1), p), (ex0, ey0, ex1, ey1), region in zip(
            placed, regions, regions_rgb, strict=True
        ):
            region[y0 - ey0 : y1 - ey0, x0 - ex0 : x1 - ex0] = p
            small = _planes(rgb_to_i420(region), ex1 - ex0, ey1 - ey0)
            for plane, part, k in zip(planes, small, (1, 2, 2), strict=True):
                plane[ey0 // k : ey1 // k, ex0 // k : ex1 // k] = part
        return out

    def render(self, pose: FacePose) -> U8:
        """HxWx3 uint8 RGB frame for ``pose`` (a new array every call)."""
        if self._loop:
            i = self.loop_index(pose.t_ns)
            frame = self._loop[i].copy()
            shape = pose.mouth_shape()
            if not shape.is_rest():
                rig = self._loop_mouth(i)
                p = rig.patch(frame, shape)
                if p is not None:
                    x0, y0, x1, y1 = rig.box
                    frame[y0:y1, x0:x1] = p
            if pose.expr_dx or pose.expr_dy or pose.expr_roll_deg:
                # the loop moves its own head; the expression layer's nods move the frame
                shift = cv2.getRotationMatrix2D(self._pivot, pose.expr_roll_deg, 1.0)
                shift[0, 2] += pose.expr_dx
                shift[1, 2] += pose.expr_dy
                frame = np.asarray(cv2.warpAffine(
                    frame, shift, (self._w, self._h), flags=cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE), dtype=np.uint8)
            return frame
        patches = self._patches(pose)
        m = self.head_matrix(pose)
        if (
            m is None
            or abs(pose.head_roll_deg) > 10.0  # _warp_patch assumes a small rotation
            or any(overlaps(a[0], b[0]) for i, a in enumerate(patches) for b in patches[i + 1 :])
        ):
            frame = self._image.copy()
            for (x0, y0, x1, y1), p in patches:
                frame[y0:y1, x0:x1] = p
            if m is None:
                return frame
            return np.asarray(self._warp(frame, m), dtype=np.uint8)
        # warp the untouched image once (or reuse the warp of a frame with the same head
        # pose), then warp only the small changed regions on top
        with self._base(m) as (base_rgb, _):
            out = base_rgb.copy()
        for box, p in patches:
            self._warp_patch(out, p, box, m)
        return out

    @contextmanager
    def _base(self, m: npt.NDArray[np.float64] | None) -> Iterator[tuple[U8, Yuv]]:
        """The avatar image warped by ``m`` (None: as it is) and its I420, to read (never to
        write) inside the ``with``; kept for the last ``BASE_WARPS`` head poses, so the
        frames of one pose share them. The arrays of a pose that falls out of the cache are
        warped into again for a new one once nobody reads them (a new 768 KiB frame each time
        would be an mmap and its page faults: about 0.25 ms a frame)."""
        if m is None:
            assert self._image_yuv is not None  # (a loop avatar never comes here)
            yield self._image, self._image_yuv
            return
        key = m.tobytes()
        with self._warps_lock:
            entry = self._warps.get(key)
            if entry is not None:
                self._warps.move_to_end(key)
                self.warp_hits += 1
                entry.readers += 1
            else:
                self.warp_misses += 1
                spare = self._spare.pop() if self._spare else None
        if entry is None:
            rgb_dst, yuv_dst = spare if spare is not None else (None, None)
            rgb = cv2.warpAffine(self._image, m, (self._w, self._h), dst=rgb_dst,
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            yuv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420, dst=yuv_dst)
            entry = _Base(np.asarray(rgb, np.uint8), np.asarray(yuv, np.uint8), readers=1)
            with self._warps_lock:  # a race warps the same pose twice, harmlessly
                old = self._warps.pop(key, None)
                if old is not None:
                    self._retire(old)
                self._warps[key] = entry
                while len(self._warps) > BASE_WARPS:
                    self._retire(self._warps.popitem(last=False)[1])
        try:
            yield entry.rgb, entry.yuv
        finally:
            with self._warps_lock:
                entry.readers -= 1
                if entry.retired and entry.readers == 0:
                    self._recycle(entry)

    def _retire(self, entry: _Base) -> None:
        """(under the lock) ``entry`` left the cache; its arrays are reused once unread."""
        entry.retired = True
        if entry.readers == 0:
            self._recycle(entry)

    def _recycle(self, entry: _Base) -> None:
        if len(self._spare) < SPARE_WARPS and not entry.recycled:
            entry.recycled = True
            self._spare.append((entry.rgb, entry.yuv))

    def _warp(self, frame: U8, m: npt.NDArray[np.float64]) -> U8:
        out = cv2.warpAffine(
            frame, m, (self._w, self._h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        return np.asarray(out, dtype=np.uint8)

    def _warp_patch(self, out: U8, patch: U8, box: Box, m: npt.NDArray[np.float64]) -> None:
        """Warp ``patch`` (the image region ``box``, already edited) into ``out`` in place."""
        placed = self._placed_patch(patch, box, m)
        if placed is not None:
            (x0, y0, x1, y1), warped = placed
            out[y0:y1, x0:x1] = warped

    def _placed_patch(
        self, patch: U8, box: Box, m: npt.NDArray[np.float64]
    ) -> tuple[Box, U8] | None:
        """``patch`` (the image region ``box``, already edited) warped by ``m``: the
        destination rectangle and its pixels, or None when nothing of it is inside.

        Only the destination pixels whose source lies at least ``PATCH_INSET`` pixels inside
        the patch are given: the rigs never edit that border ring, so the base warp already
        holds the right pixels there and the seam is invisible.
        """
        x0, y0, x1, y1 = box
        k = PATCH_INSET
        sx0, sy0, sx1, sy1 = x0 + k, y0 + k, x1 - 1 - k, y1 - 1 - k
        if sx0 >= sx1 or sy0 >= sy1:
            return None
        c = np.array([[sx0, sy0, 1.0], [sx1, sy0, 1.0], [sx0, sy1, 1.0], [sx1, sy1, 1.0]]) @ m.T
        # the axis-aligned rectangle inside the (slightly rotated) image of the inner box; a
        # side of the box on the frame's edge is edited up to the edge and replicated there by
        # both warps alike, so it extends to the frame's edge
        dx0 = 0 if x0 == 0 else max(0, int(math.ceil(max(c[0, 0], c[2, 0]))))
        dx1 = self._w if x1 == self._w else min(self._w, int(math.floor(min(c[1, 0], c[3, 0]))) + 1)
        dy0 = 0 if y0 == 0 else max(0, int(math.ceil(max(c[0, 1], c[1, 1]))))
        dy1 = self._h if y1 == self._h else min(self._h, int(math.floor(min(c[2, 1], c[3, 1]))) + 1)
        if dx0 >= dx1 or dy0 >= dy1:
            return None
        mp = m.copy()
        mp[:, 2] += m[:, :2] @ np.array([x0, y0], dtype=np.float64) - np.array([dx0, dy0])
        warped = cv2.warpAffine(
            patch,
            mp,
            (dx1 - dx0, dy1 - dy0),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        return (dx0, dy0, dx1, dy1), np.asarray(warped, dtype=np.uint8)


def _even(box: Box, w: int, h: int) -> Box:
    """``box`` widened to even coordinates (within a ``w`` x ``h`` frame, both even)."""
    x0, y0, x1, y1 = box
    return x0 & ~1, y0 & ~1, min(w, x1 + (x1 & 1)), min(h, y1 + (y1 & 1))


def _planes(yuv: Yuv, w: int, h: int) -> tuple[U8, U8, U8]:
    """Views of the Y (h x w), U and V (h/2 x w/2) planes of an I420 buffer."""
    flat = yuv.reshape(-1)
    n, q = w * h, (w // 2) * (h // 2)
    return (flat[:n].reshape(h, w), flat[n : n + q].reshape(h // 2, w // 2),
            flat[n + q : n + 2 * q].reshape(h // 2, w // 2))
