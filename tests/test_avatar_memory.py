"""Avatar memory (issue 26 #6): loaded avatars are held to ``avatars.memory_budget_mb``, least
recently used first, never one a call holds or the default; stills decode to 8 bits without a
full-size 16-bit or float copy."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

import avatars.media_input as media_input
import face.library as library_module
from avatars.media_input import sniff_and_decode
from avatars.model import DEFAULT_AVATAR_DIR, load_avatar_dir
from config import ConfigError, load_settings
from face.library import AvatarLibrary, avatar_bytes
from rtc_server.app import create_app
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates
from rtc_server.services import SERVICES
from tests.fakes.peer import QUIET_CALL, wait_until
from tests.fakes.tts import ToneTTS

SIZE = 128
IDS = [f"av_{i:012x}" for i in range(1, 6)]


@pytest.fixture
def library(monkeypatch, tmp_path) -> AvatarLibrary:
    """A library whose registered avatars are the default face with a 10-frame idle loop."""
    base = load_avatar_dir(DEFAULT_AVATAR_DIR, width=SIZE, height=SIZE)
    loop = tuple(base.image.copy() for _ in range(10))
    made = dataclasses.replace(base, loop_frames=loop, loop_fps=25.0,
                               loop_landmarks=tuple(base.landmarks for _ in loop))

    def load(folder: Path, *, width: int, height: int):  # noqa: ARG001 - the real signature
        return made if folder.name != DEFAULT_AVATAR_DIR.name else base

    lib = AvatarLibrary(data_dir=tmp_path, width=SIZE, height=SIZE)
    monkeypatch.setattr(library_module, "load_avatar_dir", load)
    monkeypatch.setattr(lib, "_folder", lambda avatar_id: tmp_path / avatar_id)
    one = avatar_bytes(lib.get(IDS[0]))
    lib.forget(IDS[0])
    lib.budget_bytes = int(2.5 * one)  # room for two
    return lib


def test_an_avatars_size_counts_its_frames_once():
    base = load_avatar_dir(DEFAULT_AVATAR_DIR, width=SIZE, height=SIZE)
    lib = AvatarLibrary(data_dir=Path("data"), width=SIZE, height=SIZE)
    size = avatar_bytes(lib.get("default"))
    assert size >= base.image.nbytes
    assert size < 40 * base.image.nbytes  # precomputed maps, not frames counted many times


def test_least_recently_used_avatars_go_past_the_budget(library):
    for avatar_id in IDS[:3]:
        library.get(avatar_id)
    assert library.loaded_ids() == IDS[1:3]  # the first went
    library.get(IDS[1])  # used again: now the most recent
    library.get(IDS[3])
    assert library.loaded_ids() == [IDS[1], IDS[3]]
    assert library.evicted == 2
    assert library.loaded_bytes <= library.budget_bytes


def test_an_avatar_a_call_holds_is_never_unloaded(library):
    held = library.acquire(IDS[0])
    for avatar_id in IDS[1:5]:
        library.get(avatar_id)
    assert IDS[0] in library.loaded_ids()
    assert library.get(IDS[0]) is held  # the same object, not a reload
    assert library.stats()["in_use"] == [IDS[0]]
    library.release(IDS[0])
    library.get(IDS[4])
    library.get(IDS[3])
    assert IDS[0] not in library.loaded_ids()  # once released it is like any other


def test_a_pinned_avatar_stays_whatever_the_budget(library):
    library.pin(IDS[0])
    library.get(IDS[0])
    for avatar_id in IDS[1:5]:
        library.get(avatar_id)
    assert IDS[0] in library.loaded_ids()


def test_the_budget_is_a_setting():
    assert load_settings(env={}).avatars.memory_budget_mb == 512
    with pytest.raises(ConfigError, match="memory_budget_mb"):
        load_settings(env={}, overrides={"avatars.memory_budget_mb": 4})


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_a_call_holds_its_avatar_until_it_ends(loopback_only, aiohttp_client):
    app = create_app(load_settings(env={}, overrides=QUIET_CALL), tts=ToneTTS())
    client = await aiohttp_client(app)
    use_host_candidates("loopback")
    bot = Bot(str(client.make_url("")).rstrip("/"))
    try:
        await bot.connect()
        assert app[SERVICES].engines.library.stats()["in_use"] == ["default"]
    finally:
        await bot.aclose()
    await wait_until(lambda: not app[SERVICES].sessions, 20)
    assert app[SERVICES].engines.library.stats()["in_use"] == []


# --- decoding stills at 8 bits --------------------------------------------------------------------
def rgba16(width: int, height: int) -> np.ndarray:
    """A 16-bit BGRA test card: a gradient, its left quarter fully transparent."""
    x = np.linspace(0, 65535, width, dtype=np.float64)[None, :].repeat(height, 0)
    img = np.empty((height, width, 4), np.uint16)
    img[..., 0] = x.astype(np.uint16)
    img[..., 1] = 30000
    img[..., 2] = (65535 - x).astype(np.uint16)
    img[..., 3] = 65535
    img[:, : width // 4, 3] = 0
    return img


def test_a_16_bit_rgba_png_decodes_to_8_bit_rgb_over_white():
    ok, png = cv2.imencode(".png", rgba16(320, 240))
    assert ok
    media = sniff_and_decode(png.tobytes(), max_video_s=30)
    (frame,) = media.frames
    assert frame.dtype == np.uint8 and frame.shape == (240, 320, 3)
    assert (frame[:, :70] == 255).all()  # transparent: white
    assert abs(int(frame[10, 200, 1]) - 30000 // 256) <= 1  # green kept, 16 -> 8 bits


def test_the_conversion_never_holds_a_full_size_float_copy():
    img = rgba16(2000, 2000)  # 32 MB of 16-bit BGRA
    float_copy = 2000 * 2000 * 3 * 4  # what one float32 BGR image of it takes: 48 MB
    tracemalloc.start()
    try:
        out = media_input._to_rgb8(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.dtype == np.uint8 and out.shape == (2000, 2000, 3)
    assert peak < out.nbytes + float_copy // 3, peak / 1e6


def test_a_still_too_big_to_decode_whole_decodes_straight_to_8_bit(monkeypatch):
    ok, png = cv2.imencode(".png", rgba16(800, 600))
    assert ok
    full = media_input._png_decode_bytes(png.tobytes(), 800, 600)
    assert full == 800 * 600 * 4 * 2
    monkeypatch.setattr(media_input, "MAX_DECODE_BYTES", full - 1)
    seen: list[int] = []
    real = cv2.imdecode

    def spy(buf, flags):
        seen.append(flags)
        return real(buf, flags)

    monkeypatch.setattr(media_input.cv2, "imdecode", spy)
    (frame,) = sniff_and_decode(png.tobytes(), max_video_s=30).frames
    assert seen == [cv2.IMREAD_COLOR]
    assert frame.dtype == np.uint8 and frame.shape == (600, 800, 3)
