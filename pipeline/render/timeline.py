"""The animation timeline of a rendered clip, as JSON-able data.

``{"fps", "duration_ms", "sample_rate", "mouth_cues": [{"t_ms", "viseme", "weight"}],
"eye_events": [{"t_ms", "event_type", "duration_ms", "direction", ...}]}``; times are
milliseconds from the start of the clip.

Mouth cues are the viseme analysis' own cues (``pipeline.lipsync.visemes``): from ``t_ms`` on the
mouth aims at ``viseme`` (one of ``VISEMES``) with strength ``weight`` (0..1, the rest REST);
a new cue starts whenever that viseme changes and pauses are REST. Eye events come from the
clip's ``IdleTimeline``: blinks (``direction`` null) and glances (``event_type`` "saccade":
the eyes move, hold and come back over ``duration_ms``; ``direction`` such as "left" or
"up-right" and the gaze offset ``dx``, ``dy`` in -1..1, image coordinates: x to the right,
y down, as seen in the video).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

from face import IdleTimeline
from pipeline.lipsync.base import VISEMES
from pipeline.lipsync.visemes import MouthCue

NS_PER_MS = 1_000_000
REST = VISEMES[0]


def idle_seed(key: str) -> int:
    """A 32-bit ``IdleTimeline`` seed derived from ``key`` (the spec's cache key): the same
    request blinks and glances the same way every time it is rendered."""
    digest = hashlib.sha256(f"idle-timeline:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def mouth_cues(
    segments: Iterable[tuple[int, Sequence[MouthCue]]], *, sample_rate: int
) -> list[dict[str, object]]:
    """Clip-wide mouth cues from per-segment cues.

    ``segments``: (start sample in the clip, that segment's cues with ``t_ms`` from its own
    start) in time order. The clip starts at rest; a cue repeating the viseme before it is
    merged into it (keeping the stronger weight), a cue without duration is dropped."""
    out: list[MouthCue] = [MouthCue(0, REST, 1.0)]
    for start, cues in segments:
        offset_ms = start * 1000 / sample_rate
        for cue in cues:
            t_ms = int(round(offset_ms + cue.t_ms))
            weight = round(float(cue.weight), 3)
            if out and out[-1].t_ms >= t_ms:
                out.pop()  # the cue before had no duration
            if out and out[-1].viseme == cue.viseme:
                if weight > out[-1].weight:
                    out[-1] = MouthCue(out[-1].t_ms, cue.viseme, weight)
                continue
            out.append(MouthCue(t_ms, cue.viseme, weight))
    return [{"t_ms": c.t_ms, "viseme": c.viseme, "weight": c.weight} for c in out]


def direction_of(dx: float, dy: float) -> str:
    """Compass direction of a gaze offset in image coordinates (y down): one of right,
    down-right, down, down-left, left, up-left, up, up-right (45 degree sectors)."""
    names = ("right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right")
    angle = math.degrees(math.atan2(dy, dx)) % 360.0
    return names[int((angle + 22.5) // 45.0) % 8]


def eye_events(idle: IdleTimeline, *, duration_ns: int) -> list[dict[str, object]]:
    """Blinks and glances that start within the first ``duration_ns`` of ``idle``, in time
    order (an event near the end may run past the clip)."""
    events: list[tuple[int, dict[str, object]]] = []
    for start in idle.blink_starts_ns(duration_ns):
        if start < 0:
            continue
        events.append(
            (
                start,
                {
                    "t_ms": round(start / NS_PER_MS),
                    "event_type": "blink",
                    "duration_ms": round(idle.blink_duration_ns(start) / NS_PER_MS),
                    "direction": None,
                },
            )
        )
    for start, end, dx, dy in idle.saccades(duration_ns):
        events.append(
            (
                start,
                {
                    "t_ms": round(start / NS_PER_MS),
                    "event_type": "saccade",
                    "duration_ms": round((end - start) / NS_PER_MS),
                    "direction": direction_of(dx, dy),
                    "dx": round(dx, 3),
                    "dy": round(dy, 3),
                },
            )
        )
    events.sort(key=lambda e: e[0])
    return [e for _, e in events]


def build_timeline(
    *,
    fps: int,
    sample_rate: int,
    n_samples: int,
    cues: list[dict[str, object]],
    idle: IdleTimeline,
) -> dict[str, object]:
    """The timeline document of a clip of ``n_samples`` audio samples."""
    duration_ns = n_samples * 1_000_000_000 // sample_rate
    return {
        "fps": fps,
        "duration_ms": round(duration_ns / NS_PER_MS),
        "sample_rate": sample_rate,
        "visemes": list(VISEMES),
        "mouth_cues": cues,
        "eye_events": eye_events(idle, duration_ns=duration_ns),
    }
