"""The registration page (/register) and the call page's avatar picker in real Chromium
against the real server, on a fresh data directory: register the default avatar's image
through the page, see the page explain refusals (not an image: 415; a blank picture: no
face), pick the new avatar on the call page and call it, and delete it (refused while it is
in a call).

The tests share one browser, one server and the avatar they register, and run in file order.
Screenshots and the browser console go to ``artifacts_dir``."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.browser import (
    chromium,
    console_log,
    get_json,
    js,
    js_await,
    server_session,
    wait_js,
    write_tone_wav,
)
from tests.conftest import ROOT, free_port, start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

DEFAULT_IMAGE = ROOT / "avatars" / "default" / "astronaut.png"
ANALYSIS_TIMEOUT_S = 180  # face analysis on a busy 2-core machine
WIDTH = HEIGHT = 512
MAX_UPLOAD_BYTES = 2_000_000  # the test server's limit: astronaut.png is 435 kB


@pytest.fixture(scope="module")
def server(
    loopback_only: None, artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real server whose avatar data lives in a fresh temporary directory."""
    data_dir = tmp_path_factory.mktemp("avatar-data")
    port = free_port()
    proc = start_server(
        port,
        env_extra={
            "AVATAR_AVATARS__DATA_DIR": str(data_dir),
            "AVATAR_AVATARS__MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        },
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def driver(
    server: str, artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("chromium-register")
    tone = write_tone_wav(tmp / "mic.wav", seconds=2.0)
    log = artifacts_dir / "chromedriver_register.log"
    with chromium(tone, tmp / "profile", log_path=log) as d:
        d.set_window_size(1100, 1400)  # tall enough for the whole registration page
        try:
            yield d
        finally:
            lines = console_log(d)
            (artifacts_dir / "browser_console_register.log").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def shared() -> dict[str, Any]:
    """What the tests hand on to the later ones (the registered avatar)."""
    return {}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("uploads")
    text = tmp / "shopping-list.png"  # a text file with an image's name
    text.write_text("eggs\nmilk\nbread\n")
    blank = tmp / "blank_white.png"
    assert cv2.imwrite(str(blank), np.full((480, 640, 3), 255, np.uint8))
    big = tmp / "huge.png"
    big.write_bytes(np.random.default_rng(0).bytes(MAX_UPLOAD_BYTES + 500_000))
    clip = tmp / "short_clip.webm"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libvpx", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(10):
            rgb = np.full((240, 320, 3), 40 + 10 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return {"text": text, "blank": blank, "big": big, "clip": clip}


def open_register_page(driver: Any, base_url: str) -> None:
    driver.get(f"{base_url}/register")
    wait_js(driver, "window.avatarRegister && avatarRegister.avatars", message="the avatar list")


def upload_through_page(driver: Any, path: Path) -> dict[str, Any]:
    """Choose ``path`` with the page's file input (as a user would), press "Register" and
    wait for the outcome; the page's ``{status, body}`` of the upload."""
    driver.find_element(By.ID, "file").send_keys(str(path))
    wait_js(
        driver,
        "avatarRegister.phase === 'idle' && avatarRegister.file && "
        f"avatarRegister.file.name === {path.name!r}",
        message=f"{path.name} to be chosen",
    )
    driver.find_element(By.ID, "upload").click()
    wait_js(
        driver,
        "['done', 'refused', 'failed'].includes(avatarRegister.phase)",
        timeout=ANALYSIS_TIMEOUT_S,
        message="the upload's outcome",
    )
    result: dict[str, Any] = js(driver, "avatarRegister.lastResult")
    return result


def result_text(driver: Any) -> str:
    return str(driver.find_element(By.ID, "result").text)


def avatar_ids(base_url: str) -> list[str]:
    return [a["id"] for a in get_json(f"{base_url}/avatars")["avatars"]]


def test_register_page_lists_the_default_avatar(driver: Any, server: str) -> None:
    open_register_page(driver, server)
    ids = js(driver, "avatarRegister.avatars.map(a => a.id)")
    assert ids == ["default"], ids  # a fresh data directory
    row = driver.find_element(By.CSS_SELECTOR, 'li[data-avatar-id="default"]')
    assert row.find_elements(By.CSS_SELECTOR, "button.delete") == [], "built-in is deletable"
    wait_js(
        driver,
        "document.querySelector('li[data-avatar-id=\"default\"] img').naturalWidth > 0",
        message="the default avatar's thumbnail",
    )
    assert driver.find_element(By.ID, "upload").get_attribute("disabled") is not None


def test_register_an_image(driver: Any, server: str, artifacts_dir: Path, shared: dict) -> None:
    open_register_page(driver, server)
    driver.find_element(By.ID, "file").send_keys(str(DEFAULT_IMAGE))
    # the name comes from the file name; the chosen picture is previewed before uploading
    wait_js(driver, "document.getElementById('name').value === 'astronaut'")
    wait_js(
        driver,
        "document.getElementById('preview-image').naturalWidth > 0",
        message="the local preview",
    )

    result = upload_through_page(driver, DEFAULT_IMAGE)
    assert result["status"] == 201, result
    avatar = result["body"]
    assert re.fullmatch(r"av_[0-9a-f]{12}", avatar["id"]), avatar
    assert avatar["name"] == "astronaut"
    assert js(driver, "avatarRegister.phases") == ["uploading", "analysing", "done"]

    wait_js(
        driver,
        "document.getElementById('result-thumbnail').naturalWidth > 0",
        message="the new avatar's thumbnail",
    )
    text = result_text(driver)
    assert "Avatar registered" in text and avatar["id"] in text, text
    assert "Face size" in text and "Sharpness" in text, text  # the quality summary
    assert not re.search(r"\b(null|undefined|NaN)\b", text), text
    link = driver.find_element(By.ID, "call-link")
    assert link.text == "Start a call with this avatar"
    assert link.get_attribute("href") == f"{server}/?avatar={avatar['id']}"

    # the list shows it too, with its thumbnail, and so does the server
    row = f'li[data-avatar-id="{avatar["id"]}"]'
    wait_js(
        driver,
        f"document.querySelector('{row} img')?.naturalWidth > 0",
        message="the new avatar in the list",
    )
    assert avatar["id"] in avatar_ids(server)
    with urllib.request.urlopen(f"{server}/avatars/{avatar['id']}/thumbnail", timeout=5) as r:
        assert r.read(3) == b"\xff\xd8\xff", "the thumbnail is not a JPEG"

    time.sleep(0.3)  # let the list's thumbnails paint
    path = artifacts_dir / "register_page.png"
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    shared["avatar"] = avatar


def test_same_file_again_is_the_same_avatar(driver: Any, shared: dict) -> None:
    result = upload_through_page(driver, DEFAULT_IMAGE)
    assert result["status"] == 200, result
    assert result["body"]["id"] == shared["avatar"]["id"]
    assert "Already registered" in result_text(driver)


def test_a_video_is_previewed_before_upload(driver: Any, bad_files: dict[str, Path]) -> None:
    driver.find_element(By.ID, "file").send_keys(str(bad_files["clip"]))
    wait_js(
        driver,
        "document.getElementById('preview-video').videoWidth === 320",
        message="the video preview",
    )
    assert js(driver, "document.getElementById('preview-image').hidden")
    assert driver.find_element(By.ID, "name").get_attribute("value") == "short clip"
    assert js(driver, "document.getElementById('result').hidden"), "the old result stays"


def test_not_an_image_is_refused(
    driver: Any, server: str, artifacts_dir: Path, bad_files: dict[str, Path]
) -> None:
    result = upload_through_page(driver, bad_files["text"])
    assert result["status"] == 415, result
    wait_js(driver, "document.getElementById('result').dataset.outcome === 'refused'")
    assert driver.find_element(By.ID, "result-title").text == "Not an image or video we can read"
    detail = driver.find_element(By.ID, "result-detail").text
    assert detail and detail == result["body"]["detail"], (detail, result)
    driver.save_screenshot(str(artifacts_dir / "register_page_not_an_image.png"))
    assert len(avatar_ids(server)) == 2


def test_too_large_is_refused(driver: Any, server: str, bad_files: dict[str, Path]) -> None:
    result = upload_through_page(driver, bad_files["big"])
    assert result["status"] == 413, result
    assert driver.find_element(By.ID, "result-title").text == "The file is too large"
    assert driver.find_element(By.ID, "result-detail").text == result["body"]["detail"]
    assert len(avatar_ids(server)) == 2


def test_blank_picture_has_no_face(
    driver: Any, server: str, artifacts_dir: Path, bad_files: dict[str, Path]
) -> None:
    result = upload_through_page(driver, bad_files["blank"])
    assert result["status"] == 422 and result["body"]["error"] == "no_face", result
    assert driver.find_element(By.ID, "result-title").text == "No face found"
    assert driver.find_element(By.ID, "result-detail").text == result["body"]["detail"]
    assert js(driver, "document.getElementById('result').dataset.error") == "no_face"
    driver.save_screenshot(str(artifacts_dir / "register_page_no_face.png"))
    assert len(avatar_ids(server)) == 2


def test_call_the_registered_avatar(
    driver: Any, server: str, artifacts_dir: Path, shared: dict
) -> None:
    avatar_id = shared["avatar"]["id"]
    # the success link preselects the avatar
    driver.get(f"{server}/?avatar={avatar_id}")
    wait_js(driver, "window.avatarCall && avatarCall.avatars", message="the avatar picker")
    assert js(driver, "avatarCall.avatarId") == avatar_id

    # a plain call page starts on the default avatar; pick the new one
    driver.get(f"{server}/")
    wait_js(driver, "window.avatarCall && avatarCall.avatars", message="the avatar picker")
    picker = Select(driver.find_element(By.ID, "avatar-select"))
    assert picker.first_selected_option.get_attribute("value") == "default"
    assert {o.get_attribute("value") for o in picker.options} == {"default", avatar_id}
    picker.select_by_value(avatar_id)
    assert js(driver, "avatarCall.avatarId") == avatar_id
    assert js(driver, "location.search") == f"?avatar={avatar_id}"
    assert driver.find_element(By.ID, "register-link").get_attribute("href") == (
        f"{server}/register"
    )

    session_id = js_await(driver, "avatarCall.start()", timeout=30)
    wait_js(driver, "avatarCall.state === 'connected'", timeout=20)
    assert driver.find_element(By.ID, "avatar-select").get_attribute("disabled") is not None
    wait_js(
        driver,
        f"document.getElementById('remote').videoWidth === {WIDTH} && "
        f"document.getElementById('remote').videoHeight === {HEIGHT}",
        timeout=15,
        message=f"a decoded {WIDTH}x{HEIGHT} video",
    )
    frames = "document.getElementById('remote').getVideoPlaybackQuality().totalVideoFrames"
    first = js(driver, frames)
    time.sleep(1.0)
    assert js(driver, frames) > first + 10, "video frames are not being decoded"

    session = server_session(server, session_id)
    assert session is not None, f"session {session_id} not in GET /sessions"
    assert session["avatar_id"] == avatar_id, session
    assert js(driver, "avatarCall.avatarId") == avatar_id
    assert js(driver, "document.getElementById('errors').hidden"), "the page shows an error"

    wait_js(driver, "avatarCall.statsSnapshot().fps", message="stats")
    path = artifacts_dir / "call_page_registered_avatar.png"
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    shared["session_id"] = session_id


def delete_from_list(driver: Any, avatar_id: str) -> None:
    """Press the avatar's Delete button twice (the first press only arms it)."""
    button = driver.find_element(By.CSS_SELECTOR, f'li[data-avatar-id="{avatar_id}"] .delete')
    button.click()
    assert button.text == "Really delete?"
    button.click()


def test_delete_waits_for_the_call_to_end(
    driver: Any, server: str, artifacts_dir: Path, shared: dict
) -> None:
    avatar_id = shared["avatar"]["id"]
    assert js(driver, "avatarCall.state") == "connected", "needs the previous test's call"
    call_tab = driver.current_window_handle
    driver.switch_to.new_window("tab")
    try:
        open_register_page(driver, server)
        delete_from_list(driver, avatar_id)
        message = f'li[data-avatar-id="{avatar_id}"] .row-message'
        wait_js(
            driver,
            f"!document.querySelector('{message}').hidden",
            message="the refusal beside the avatar",
        )
        text = driver.find_element(By.CSS_SELECTOR, message).text
        assert "in a call right now" in text, text
        driver.save_screenshot(str(artifacts_dir / "register_page_delete_in_call.png"))
        assert avatar_id in avatar_ids(server)
    finally:
        driver.close()
        driver.switch_to.window(call_tab)

    js(driver, "avatarCall.stop() || true")
    deadline = time.monotonic() + 15
    while server_session(server, shared["session_id"]) is not None:
        assert time.monotonic() < deadline, "the session did not end"
        time.sleep(0.1)

    open_register_page(driver, server)
    delete_from_list(driver, avatar_id)
    wait_js(
        driver,
        f"!document.querySelector('li[data-avatar-id=\"{avatar_id}\"]')",
        message="the avatar to leave the list",
    )
    assert "Deleted “astronaut”" in driver.find_element(By.ID, "list-status").text
    assert avatar_ids(server) == ["default"]
