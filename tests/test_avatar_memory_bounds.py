"""Avatar memory (issue 26 #6), the bounds: a load never blocks the event loop's calls into the
library, makes room before it starts, a preload respects the budget; large stills decode
without a full-size 16-bit or second 8-bit copy; the server's malloc gives big blocks back."""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

import avatars.media_input as media_input
import face.library as library_module
from avatars.media_input import sniff_and_decode
from avatars.model import DEFAULT_AVATAR_DIR, load_avatar_dir
from face.library import AvatarLibrary, avatar_bytes

SIZE = 128
IDS = [f"av_{i:012x}" for i in range(1, 6)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def made():
    """A registered avatar as loaded: the default face with a 10-frame idle loop."""
    base = load_avatar_dir(DEFAULT_AVATAR_DIR, width=SIZE, height=SIZE)
    loop = tuple(base.image.copy() for _ in range(10))
    return dataclasses.replace(base, loop_frames=loop, loop_fps=25.0,
                               loop_landmarks=tuple(base.landmarks for _ in loop))


def make_library(monkeypatch, tmp_path, load) -> AvatarLibrary:
    lib = AvatarLibrary(data_dir=tmp_path, width=SIZE, height=SIZE)
    monkeypatch.setattr(library_module, "load_avatar_dir", load)
    monkeypatch.setattr(lib, "_folder", lambda avatar_id: tmp_path / avatar_id)
    return lib


def one_size(made) -> int:
    return avatar_bytes(library_module.LoadedAvatar(
        IDS[0], made, library_module.FaceRenderer(made)))


def test_release_stats_and_loaded_avatars_never_wait_for_a_load(monkeypatch, tmp_path, made):
    loading, go_on = threading.Event(), threading.Event()

    def load(folder: Path, *, width: int, height: int):  # noqa: ARG001 - the real signature
        if folder.name == IDS[1]:
            loading.set()
            go_on.wait(30)
        return made

    lib = make_library(monkeypatch, tmp_path, load)
    held = lib.acquire(IDS[0])
    slow = threading.Thread(target=lib.get, args=(IDS[1],))
    slow.start()
    try:
        assert loading.wait(10)
        results: list[object] = []

        def loop_side() -> None:  # what the event loop calls while a load runs
            lib.release(IDS[0])
            results.append(lib.stats())
            results.append(lib.loaded_ids())
            results.append(lib.get(IDS[0]))

        quick = threading.Thread(target=loop_side)
        quick.start()
        quick.join(10)
        assert not quick.is_alive(), "release/stats/get of a loaded avatar waited for a load"
        assert results[2] is held
        assert slow.is_alive()  # the load was still running all along
    finally:
        go_on.set()
        slow.join(10)
    assert IDS[1] in lib.loaded_ids()


def test_a_load_makes_room_before_it_starts(monkeypatch, tmp_path, made):
    size = one_size(made)
    seen: list[int] = []

    def load(folder: Path, *, width: int, height: int):  # noqa: ARG001
        seen.append(lib.loaded_bytes)
        return made

    lib = make_library(monkeypatch, tmp_path, load)
    monkeypatch.setattr(lib, "_estimate", lambda avatar_id: size)
    lib.budget_bytes = int(2.5 * size)
    for avatar_id in IDS[:4]:
        lib.get(avatar_id)
    # while each avatar decoded, the others already fitted the budget beside it
    assert all(before + size <= lib.budget_bytes for before in seen), (seen, size)
    assert lib.loaded_ids() == IDS[2:4]


def test_a_preload_loads_only_what_fits_beside_the_avatars_in_use(monkeypatch, tmp_path, made):
    size = one_size(made)
    loads: list[str] = []

    def load(folder: Path, *, width: int, height: int):  # noqa: ARG001
        loads.append(folder.name)
        return made

    lib = make_library(monkeypatch, tmp_path, load)
    monkeypatch.setattr(lib, "_estimate", lambda avatar_id: size)
    lib.budget_bytes = int(2.5 * size)
    lib.acquire(IDS[0])
    lib.acquire(IDS[1])
    assert lib.preload(IDS[2]) is False  # two calls hold the room: not even decoded
    assert loads == IDS[:2]
    lib.release(IDS[1])
    assert lib.preload(IDS[2]) is True  # the released one makes room
    assert lib.loaded_ids() == [IDS[0], IDS[2]]
    assert lib.loaded_bytes <= lib.budget_bytes


def test_a_preload_never_leaves_the_library_over_its_budget(monkeypatch, tmp_path, made):
    def load(folder: Path, *, width: int, height: int):  # noqa: ARG001
        return made

    lib = make_library(monkeypatch, tmp_path, load)
    lib.budget_bytes = one_size(made) // 2  # smaller than the avatar, and its size unknown
    assert lib.preload(IDS[0]) is False
    assert lib.loaded_ids() == []
    assert lib.get(IDS[0]) is not None  # a call's load is kept all the same


# --- large stills -----------------------------------------------------------------------------
def traced_peak(fn):
    tracemalloc.start()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


def test_a_large_rgb_png_is_scaled_before_its_colour_conversion():
    rng = np.random.default_rng(3)
    img = cv2.resize(rng.integers(0, 256, (60, 80, 3), np.uint8), (2400, 1800))
    ok, png = cv2.imencode(".png", img)
    assert ok
    data = png.tobytes()
    full = img.nbytes  # 13 MB: the decode itself
    media, peak = traced_peak(lambda: sniff_and_decode(data, max_video_s=30))
    (frame,) = media.frames
    assert frame.dtype == np.uint8 and frame.shape == (960, 1280, 3)
    expected = cv2.cvtColor(cv2.resize(img, (1280, 960), interpolation=cv2.INTER_AREA),
                            cv2.COLOR_BGR2RGB)
    assert np.array_equal(frame, expected)
    assert peak < 1.5 * full, (peak / 1e6, full / 1e6)  # no second full-size copy


def test_a_16_bit_rgba_png_too_big_to_decode_whole_is_never_held_at_full_size(monkeypatch):
    w = h = 2000
    img = np.empty((h, w, 4), np.uint16)
    img[..., 0] = np.linspace(0, 65535, w, dtype=np.float32)[None, :].astype(np.uint16)
    img[..., 1] = 30000
    img[..., 2] = 12000
    img[..., 3] = 65535
    ok, png = cv2.imencode(".png", img)
    assert ok
    data = png.tobytes()
    full16 = w * h * 4 * 2  # 32 MB: the whole decode at 16 bits with alpha
    monkeypatch.setattr(media_input, "MAX_DECODE_BYTES", 1024 * 1024)
    media, peak = traced_peak(lambda: sniff_and_decode(data, max_video_s=30, max_side=640))
    (frame,) = media.frames
    assert frame.dtype == np.uint8 and frame.shape == (640, 640, 3)
    assert abs(int(frame[5, 320, 1]) - 30000 // 256) <= 1  # 16 -> 8 bits, RGB order
    assert abs(int(frame[5, 320, 0]) - 12000 // 256) <= 1
    assert peak < full16 / 4, (peak / 1e6, full16 / 1e6)


# --- the server's malloc ------------------------------------------------------------------------
FREE_TWICE = """
import sys
from pathlib import Path
import numpy as np
if sys.argv[1] == "tuned":
    from rtc_server.__main__ import tune_malloc
    assert tune_malloc()

def rss_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

block = np.ones(24 * 2**20, np.uint8)  # mmapped (over the threshold), then freed
del block
before = rss_kb()
small = [np.ones(600 * 1024, np.uint8) for _ in range(16)]  # 9.4 MB of frame-sized blocks
keep = [np.ones(1000, np.uint8) for _ in range(2000)]  # later allocations above them
del small
print(rss_kb() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_the_server_gives_freed_frame_sized_blocks_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", FREE_TWICE, "tuned"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    kept_kb = int(out.split()[-1])
    assert kept_kb < 4 * 1024, kept_kb  # the 9.4 MB went back (munmap), not into an arena
