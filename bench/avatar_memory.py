"""Avatar memory: peak RSS of registering an avatar, and the server's RSS over many calls.

    .venv/bin/python -m bench.avatar_memory register [--label after]
    unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.avatar_memory soak \
        --label after'

``register``: each case in a fresh process (``--child CASE``), through the real registration
(``RegistrationService``: decode, dlib analysis, prepare, store) into a temporary data folder:

* ``png16``: a 16-bit RGBA PNG of 7000x7000 (a smooth gradient with a transparent band and
  the default face pasted 5x), written by ``cv2.imwrite`` so the file stays small;
* ``video720``: 10 s of 1280x720 at 25 fps (H.264) of the default face drifting and zooming.

Per case: RSS after start-up (imports, analyzer loaded, the process's malloc set up as the
server's), the peak during the registration (``VmHWM`` after ``/proc/self/clear_refs``), RSS
after it, then the avatar loaded through ``AvatarLibrary`` (512x512 output, the server's
default) with its accounted size, and RSS once it is deleted and forgotten. Results go to
``bench/results/avatar_memory.json``, kept per ``--label``.

``soak``: ``bench.soak``'s connect/disconnect cycles (200 after 20 warm-up) against a server
process; ``--env K=V`` sets its environment (e.g. ``MALLOC_ARENA_MAX=8`` for the old arenas).
Results go to ``bench/results/soak_memory.json``, kept per ``--label``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avatars import DEFAULT_AVATAR_DIR  # noqa: E402
from bench.common import RESULTS, ROOT, machine, print_table  # noqa: E402

CASES = ("png16", "video720")
PNG_SIDE = 7000
FACE_SCALE = 5.0  # the 512x512 portrait pasted this much larger into the 7000x7000 PNG
VIDEO_SIZE = (1280, 720)
VIDEO_S = 10.0
VIDEO_FPS = 25
FACE_CENTRE = (225.0, 132.0)  # in the portrait (bench/registration.py moves it the same way)
MB = 1024 * 1024


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _portrait_bgr() -> np.ndarray:
    bgr = cv2.imread(str(DEFAULT_AVATAR_DIR / "astronaut.png"), cv2.IMREAD_COLOR)
    assert bgr is not None
    return bgr


def make_png16(path: Path) -> None:
    """7000x7000 16-bit BGRA: gradient background, a transparent band on the left, the face."""
    n = PNG_SIDE
    ramp = np.linspace(8000, 60000, n, dtype=np.float32)
    img = np.empty((n, n, 4), np.uint16)
    img[..., 0] = ramp[None, :].astype(np.uint16)
    img[..., 1] = ramp[:, None].astype(np.uint16)
    img[..., 2] = 30000
    img[..., 3] = 65535
    img[:, : n // 10, 3] = 0  # transparent: composited over white (or dropped)
    side = int(512 * FACE_SCALE)
    face = cv2.resize(_portrait_bgr(), (side, side), interpolation=cv2.INTER_LINEAR)
    y0 = x0 = (n - side) // 2
    img[y0 : y0 + side, x0 : x0 + side, :3] = face.astype(np.uint16) * 257
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise RuntimeError("cv2.imwrite failed")


def make_video(path: Path) -> None:
    """10 s of 1280x720 H.264: the portrait moving, encoded frame by frame."""
    import av

    face = cv2.cvtColor(_portrait_bgr(), cv2.COLOR_BGR2RGB)
    w, h = VIDEO_SIZE
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for i in range(int(VIDEO_S * VIDEO_FPS)):
            t = i / VIDEO_FPS
            s = 2.0 + 0.25 * math.sin(2 * math.pi * t / 7.0)
            cx = w / 2 + 140 * math.sin(2 * math.pi * t / 5.0)
            cy = h / 2 + 30 * math.sin(2 * math.pi * t / 3.1)
            m = np.array([[s, 0, cx - s * FACE_CENTRE[0]], [0, s, cy - s * FACE_CENTRE[1]]])
            rgb = cv2.warpAffine(face, m, (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _inputs(folder: Path) -> dict[str, Path]:
    made = {"png16": folder / "big16.png", "video720": folder / "walk720.mp4"}
    if not made["png16"].exists():
        make_png16(made["png16"])
    if not made["video720"].exists():
        make_video(made["video720"])
    return made


def _loaded_bytes(loaded: Any) -> int:
    """``avatar_bytes`` where the library has it, else the frames' bytes."""
    try:
        from face.library import avatar_bytes
    except ImportError:  # an older version: its image and loop frames
        avatar = loaded.avatar
        return int(avatar.image.nbytes + sum(f.nbytes for f in avatar.loop_frames))
    return avatar_bytes(loaded)


def child(case: str, source: Path) -> dict[str, Any]:
    """One registration in this (fresh) process; the figures as a dict."""
    from avatars.registration import RegistrationService
    from avatars.store import AvatarStore
    from config import load_settings
    from face.library import AvatarLibrary

    try:  # the server's malloc settings, where this version has them
        from rtc_server.__main__ import tune_malloc
    except ImportError:
        pass
    else:
        tune_malloc()
    settings = load_settings()
    cv2.setNumThreads(1)  # as the server
    data = source.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        store = AvatarStore(Path(tmp))
        service = RegistrationService(store, settings.avatars)
        asyncio.run(asyncio.to_thread(service.analyzer))
        gc.collect()
        base = _status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        t0 = time.perf_counter()
        try:
            record, _ = asyncio.run(service.register(data, case))
            outcome = f"{record.frames} frames {record.width}x{record.height}"
        except Exception as exc:  # noqa: BLE001 - a refusal is a result too
            record = None
            outcome = f"refused: {getattr(exc, 'code', type(exc).__name__)}"
        seconds = time.perf_counter() - t0
        peak = _status_mb("VmHWM")
        gc.collect()
        after = _status_mb("VmRSS")
        row: dict[str, Any] = {
            "case": case,
            "file_mb": round(len(data) / MB, 2),
            "outcome": outcome,
            "seconds": round(seconds, 2),
            "rss_start_mb": round(base, 1),
            "peak_rss_mb": round(peak, 1),
            "peak_growth_mb": round(peak - base, 1),
            "rss_after_mb": round(after, 1),
        }
        if record is not None:
            media = settings.media
            library = AvatarLibrary(data_dir=Path(tmp), width=media.video_width,
                                    height=media.video_height, store=store)
            loaded = library.get(record.id)
            row["loaded_avatar_mb"] = round(_loaded_bytes(loaded) / MB, 1)
            row["rss_loaded_mb"] = round(_status_mb("VmRSS"), 1)
            del loaded
            library.forget(record.id)
            store.delete(record.id)
            gc.collect()
            row["rss_deleted_mb"] = round(_status_mb("VmRSS"), 1)
        service.close()
    return row


def _merge(name: str, label: str, payload: dict[str, Any], note: str) -> Path:
    path = RESULTS / f"{name}.json"
    old: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    runs = dict(old.get("runs", {}))
    runs[label] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **payload}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "note": note, "runs": runs}, indent=1) + "\n")
    return path


def register_main(args: argparse.Namespace) -> None:
    args.inputs.mkdir(parents=True, exist_ok=True)
    sources = _inputs(args.inputs)
    rows = []
    for case in args.cases.split(","):
        out = subprocess.run(
            [sys.executable, "-m", "bench.avatar_memory", "register", "--child", case,
             "--source", str(sources[case])],
            cwd=ROOT, check=True, capture_output=True, text=True,
        )
        rows.append({"label": args.label, **json.loads(out.stdout.strip().splitlines()[-1])})
    print_table(rows)
    note = ("peak_growth_mb = VmHWM during the registration minus VmRSS before it (analyzer "
            "loaded); each case in a fresh process")
    print(f"wrote {_merge('avatar_memory', args.label, {'rows': rows}, note)}")


def soak_main(args: argparse.Namespace) -> None:
    from bench.common import start_server
    from bench.soak import SERVER_ENV, soak

    env = dict(SERVER_ENV)
    env.update(kv.split("=", 1) for kv in args.env)
    proc, url = start_server(env)
    try:
        result = asyncio.run(soak(url, proc.pid, cycles=args.cycles, warmup=args.warmup,
                                  every=args.every))
    finally:
        proc.terminate()
        proc.wait()
    rows = [asdict(s) for s in result.snapshots]
    summary = result.summary()
    summary["mb_per_cycle"] = round(result.rss_growth_bytes / MB / max(1, result.cycles), 3)
    print_table(rows)
    print(json.dumps(summary, indent=1))
    note = "bench.soak's cycles; rss_growth = RSS at the end minus RSS after the warm-up"
    payload = {"env": args.env, "summary": summary, "snapshots": rows,
               "failures": result.failures}
    print(f"wrote {_merge('soak_memory', args.label, payload, note)}")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    reg = sub.add_parser("register")
    reg.add_argument("--label", default="after", help="name of this run in the JSON")
    reg.add_argument("--cases", default=",".join(CASES))
    reg.add_argument("--inputs", type=Path,
                     default=Path(tempfile.gettempdir()) / "avatar_memory")
    reg.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    reg.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    so = sub.add_parser("soak")
    so.add_argument("--label", default="after")
    so.add_argument("--cycles", type=int, default=200)
    so.add_argument("--warmup", type=int, default=20)
    so.add_argument("--every", type=int, default=25)
    so.add_argument("--env", action="append", default=[], help="K=V for the server")
    args = p.parse_args()
    if args.what == "register" and args.child:
        print(json.dumps(child(args.child, args.source)))
    elif args.what == "register":
        register_main(args)
    else:
        soak_main(args)


if __name__ == "__main__":
    main()
