"""Avatar memory: the peak memory of decoding an uploaded still (registration's first step),
each case in a fresh process: the growth of its peak RSS (VmHWM, reset just before).

Cases: a 7000x7000 16-bit RGBA PNG (small on disk: a smooth card) and the same as 8-bit RGB
JPEG, decoded as registration does now, and the PNG the old way (whole 16-bit decode, then a
full-size float conversion: ``--old``, emulated by lifting the bounds).

Run: ``.venv/bin/python -m bench.avatar_decode``"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench.common import ROOT, machine, print_table, write_result

SIDE = 7000


def make_files(folder: Path) -> dict[str, Path]:
    x = np.linspace(0, 65535, SIDE, dtype=np.float32)
    img = np.empty((SIDE, SIDE, 4), np.uint16)
    img[..., 0] = x[None, :].astype(np.uint16)
    img[..., 1] = x[:, None].astype(np.uint16)
    img[..., 2] = 30000
    img[..., 3] = 65535
    img[: SIDE // 8, :, 3] = 0
    png = folder / "card16.png"
    cv2.imwrite(str(png), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    jpg = folder / "card8.jpg"
    cv2.imwrite(str(jpg), (img[..., :3] >> 8).astype(np.uint8))
    return {"png16_rgba": png, "jpeg8": jpg}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(path: str, old: bool) -> None:
    import avatars.media_input as media_input

    if old:  # the path before: decode everything at 16 bits, convert the whole image at once
        media_input.MAX_DECODE_BYTES = 1 << 62
        media_input._STRIP_ROWS = 1 << 30
    data = Path(path).read_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    media = media_input.sniff_and_decode(data, max_video_s=30)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    frame = media.frames[0]
    print(json.dumps({"growth_mb": round((peak - base) / 1024), "peak_mb": round(peak / 1024),
                      "before_mb": round(base / 1024),
                      "decode_s": round(seconds, 2), "out": list(frame.shape),
                      "file_kb": round(len(data) / 1024)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--old", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.old)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp))
        for name, path, old in [("png16_rgba", files["png16_rgba"], False),
                                ("png16_rgba", files["png16_rgba"], True),
                                ("jpeg8", files["jpeg8"], False)]:
            cmd = [sys.executable, "-m", "bench.avatar_decode", "--child", str(path)]
            out = subprocess.run(cmd + (["--old"] if old else []), cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout
            row = {"case": name, "path": "old" if old else "now", **json.loads(out)}
            rows.append(row)
            print_table([row])
    print_table(rows)
    write_result("avatar_memory_decode", {"machine": machine(), "side_px": SIDE, "rows": rows})


if __name__ == "__main__":
    main()
