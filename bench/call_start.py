"""Call start with a registered avatar versus the default one, and the memory of a loaded
avatar.

Registers (over HTTP, real dlib analysis) the default portrait as an image avatar and a 10 s,
25 fps, 1280x720 video of it moving; then, for each avatar, times the bot's first video frame
on the first call (the avatar is loaded from disk: cold) and on later calls (warm), and reads
the server's resident memory before and after the avatar is first loaded.

Run: ``unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.call_start'``"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import cv2
import numpy as np

from bench.common import print_table, start_server, write_result
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates
from tests.fakes.prepare import encode_video, portrait_rgb

WARM_CALLS = 5


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def video_720p(seconds: int = 10, fps: int = 25) -> bytes:
    face = portrait_rgb((600, 600))
    frames = []
    for i in range(seconds * fps):
        canvas = np.full((720, 1280, 3), 200, np.uint8)
        x = 340 + int(60 * np.sin(2 * np.pi * i / 125))
        y = 60 + int(20 * np.sin(2 * np.pi * i / 90))
        canvas[y:y + 600, x:x + 600] = face
        frames.append(cv2.GaussianBlur(canvas, (3, 3), 0))
    return encode_video(frames, fps)


def load_cost(folder: Path, label: str) -> dict[str, object]:
    """Time and memory of loading one avatar as the server does (fitted to 512x512)."""
    from avatars.model import load_avatar_dir
    from face import FaceRenderer

    t0 = time.perf_counter()
    avatar = load_avatar_dir(folder, width=512, height=512)
    FaceRenderer(avatar)
    seconds = time.perf_counter() - t0
    arrays = [avatar.image, *avatar.loop_frames, *avatar.loop_landmarks]
    return {"avatar": label, "load_s": round(seconds, 2), "frames": len(avatar.loop_frames),
            "pixels_mb": round(sum(a.nbytes for a in arrays) / 2**20, 1)}


async def register(url: str, data: bytes, name: str, mime: str) -> tuple[str, float]:
    form = aiohttp.FormData()
    form.add_field("name", name)
    form.add_field("file", data, filename=name, content_type=mime)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as http, http.post(f"{url}/avatars", data=form) as r:
        body = await r.json()
        assert r.status in (200, 201), body
    return body["id"], time.perf_counter() - t0


async def first_frame_ms(url: str, avatar_id: str) -> float:
    bot = Bot(url, avatar_id=avatar_id)
    try:
        await bot.connect()
        await bot.wait_first_video(20)
        return float(bot.summary()["first_video_frame_ms"])
    finally:
        await bot.aclose()
        await asyncio.sleep(0.3)


async def main() -> None:
    use_host_candidates("loopback")
    with tempfile.TemporaryDirectory() as data:
        proc, url = start_server({"AVATAR_AVATARS__DATA_DIR": data})
        try:
            png = cv2.imencode(".png", cv2.cvtColor(portrait_rgb(), cv2.COLOR_RGB2BGR))[1]
            image_id, image_reg_s = await register(url, png.tobytes(), "image.png", "image/png")
            video_id, video_reg_s = await register(url, video_720p(), "video.mp4", "video/mp4")
            await first_frame_ms(url, "default")  # warm-up: imports, codecs
            rows = []
            for label, avatar_id in (("default", "default"), ("registered image", image_id),
                                     ("registered 10 s video", video_id)):
                before = rss_mb(proc.pid)
                cold = await first_frame_ms(url, avatar_id)
                after = rss_mb(proc.pid)
                warm = [await first_frame_ms(url, avatar_id) for _ in range(WARM_CALLS)]
                rows.append({"avatar": label, "first_call_ms": cold,
                             "warm_median_ms": statistics.median(warm),
                             "rss_added_by_load_mb": round(after - before, 1)})
        finally:
            proc.terminate()
            proc.wait()
        loads = [load_cost(Path(data) / "avatars" / i, label)
                 for i, label in ((image_id, "registered image"),
                                  (video_id, "registered 10 s video"))]
    print_table(rows)
    print_table(loads)
    summary = {"registration_s": {"image_512": round(image_reg_s, 2),
                                  "video_10s_720p": round(video_reg_s, 2)},
               "calls": rows, "loaded_avatar": loads,
               "note": "a registered avatar is loaded in the background right after "
                       "registration, so its first call is warm; loaded_avatar is the cost "
                       "of that load (also paid by the first call after a restart)"}
    print(summary)
    write_result("call_start", summary)


if __name__ == "__main__":
    asyncio.run(main())
