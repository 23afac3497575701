"""A fake render function with the signature of ``ClipRenderer.render``: no models, no codecs.

Its behaviour comes from ``key=value`` words in ``spec.text`` (audio specs use the defaults):
``steps`` (20) progress steps of ``step_s`` (0.01) seconds each, each appending to a partial
video file; ``fail=bad`` raises BadRequest at ``fail_at`` (step 2), ``fail=crash`` a
RuntimeError whose message holds a path (which must never reach a client). The cancel event
is checked before every step; cancellation raises ``RenderCancelled``, a class of its own
here (so the fake does not import the render core) recognised by name like the real one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common.errors import BadRequest
from pipeline.render.spec import RenderSpec


class RenderCancelled(Exception):
    """Same name as pipeline.render.core.RenderCancelled."""


def params(spec: RenderSpec) -> dict[str, str]:
    words = (spec.text or "").split()
    return dict(w.split("=", 1) for w in words if "=" in w)


def fake_run(
    spec: RenderSpec,
    out_dir: Path,
    progress: Callable[[float, str], None],
    cancel: threading.Event,
) -> dict[str, object]:
    p = params(spec)
    steps = int(p.get("steps", 20))
    step_s = float(p.get("step_s", 0.01))
    fail = p.get("fail")
    fail_at = int(p.get("fail_at", 2))
    video = f"video.{spec.format}"
    progress(0.0, "synthesising")
    with open(out_dir / video, "wb") as f:
        for i in range(steps):
            if cancel.is_set():
                raise RenderCancelled("cancelled")
            if fail and i == fail_at:
                if fail == "bad":
                    raise BadRequest("the audio file holds no audio stream")
                raise RuntimeError(f"codec exploded in {out_dir}/secret")
            time.sleep(step_s)
            f.write(b"\0" * 256)
            f.flush()
            progress(100.0 * (i + 1) / steps * 0.95, "rendering")
    if cancel.is_set():
        raise RenderCancelled("cancelled")
    progress(95.0, "encoding")
    (out_dir / "audio.ogg").write_bytes(b"OggS" + b"\0" * 60)
    (out_dir / "audio.wav").write_bytes(b"RIFF" + b"\0" * 60)
    (out_dir / "timeline.json").write_text(json.dumps({"fps": spec.fps, "mouth_cues": []}))
    progress(100.0, "finishing")
    return {
        "files": {"video": video, "audio_ogg": "audio.ogg", "audio_wav": "audio.wav",
                  "timeline": "timeline.json"},
        "duration_s": steps / spec.fps,
        "frames": steps,
        "fps": spec.fps,
        "format": spec.format,
        "width": 64,
        "height": 64,
        "engine": "fake",
        "voice": spec.voice,
        "pid": os.getpid(),
    }
