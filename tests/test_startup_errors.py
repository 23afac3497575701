"""A model or avatar that cannot load, a data folder that cannot be made, or an address that
cannot be listened on stops ``python -m rtc_server`` with one clear line.

Each case runs the real server process with a bad config file: it must exit with status 1
and print exactly one ``start-up failed: ...`` line on stderr naming the setting to change
and its file or value, and no traceback."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent

QUIET = {"conversation": {"listen": False}}


def wav2lip_missing(tmp: Path) -> tuple[dict, Path]:
    path = tmp / "wav2lip_gan.pth"
    return {"lipsync": {"engine": "wav2lip", "wav2lip_model": str(path), "device": "cpu"}}, path


def wav2lip_corrupt(tmp: Path) -> tuple[dict, Path]:
    path = tmp / "wav2lip.onnx"
    path.write_bytes(b"\x00not an onnx model" * 100)
    return {"lipsync": {"engine": "wav2lip", "wav2lip_model": str(path), "device": "cpu"}}, path


def piper_missing(tmp: Path) -> tuple[dict, Path]:
    path = tmp / "voices" / "en_GB-nobody-medium.onnx"
    return {"engines": {"piper_voice": str(path)}}, path


def piper_corrupt(tmp: Path) -> tuple[dict, Path]:
    path = tmp / "broken-voice.onnx"
    path.write_bytes(b"garbage" * 100)
    Path(f"{path}.json").write_text("{}")
    return {"engines": {"piper_voice": str(path)}}, path


def whisper_missing(tmp: Path) -> tuple[dict, Path]:
    path = tmp / "whisper-small-ct2"
    return {"stt": {"model": str(path)}, "conversation": {"listen": True}}, path


def whisper_corrupt(tmp: Path) -> tuple[dict, Path]:
    path = tmp / "whisper-ct2"
    path.mkdir()
    (path / "model.bin").write_bytes(b"\x01\x02\x03")
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    return {"stt": {"model": str(path)}, "conversation": {"listen": True}}, path


def insightface_missing(tmp: Path) -> tuple[dict, Path]:
    path = tmp / "insightface"
    return {"avatars": {"analyzer": "insightface", "insightface_root": str(path)}}, path


def default_avatar_missing(tmp: Path) -> tuple[dict, Path]:
    data = tmp / "data"
    data.mkdir()
    return {"avatars": {"default": "av_0123456789ab", "data_dir": str(data)}}, data


CASES: dict[str, tuple[Callable[[Path], tuple[dict, Path]], str]] = {
    "wav2lip-missing": (wav2lip_missing, "lipsync.wav2lip_model"),
    "wav2lip-corrupt": (wav2lip_corrupt, "lipsync.wav2lip_model"),
    "piper-missing": (piper_missing, "engines.piper_voice"),
    "piper-corrupt": (piper_corrupt, "engines.piper_voice"),
    "whisper-missing": (whisper_missing, "stt.model"),
    "whisper-corrupt": (whisper_corrupt, "stt.model"),
    "insightface-missing": (insightface_missing, "avatars.insightface_root"),
    "default-avatar-missing": (default_avatar_missing, "avatars.default"),
}


def merged(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for section, values in part.items():
            out.setdefault(section, {}).update(values)
    return out


def failed_start_line(tmp_path: Path, config: dict, port: int | None = None) -> str:
    """Run the server with ``config``; the one ``start-up failed:`` line it must print."""
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump(merged(
        QUIET, {"server": {"host": "127.0.0.1", "log_level": "warning"}}, config
    )))
    proc = subprocess.run(
        [sys.executable, "-m", "rtc_server", "--config", str(config_file),
         "--port", str(port or free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )
    stderr = proc.stderr
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("start-up failed:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(CASES))
def test_a_model_that_does_not_load_is_one_clear_line_and_exit_1(case, tmp_path):
    make, setting = CASES[case]
    config, path = make(tmp_path)
    line = failed_start_line(tmp_path, config)
    assert setting in line, line
    assert str(path) in line, line


# --------------------------------------------------------------------------- OS errors

# (config, the setting, its value as the line must show it, the port to use or None)
OsCase = tuple[dict, str, str, int | None]


def data_dir_below_a_file(tmp: Path, stack: contextlib.ExitStack) -> OsCase:
    (tmp / "plain").write_text("a file, not a folder")
    data = tmp / "plain" / "data"
    return {"avatars": {"data_dir": str(data)}}, "avatars.data_dir", str(data), None


def data_dir_is_a_file(tmp: Path, stack: contextlib.ExitStack) -> OsCase:
    data = tmp / "data"
    data.write_text("a file, not a folder")
    return {"avatars": {"data_dir": str(data)}}, "avatars.data_dir", str(data), None


def data_dir_below_a_dangling_link(tmp: Path, stack: contextlib.ExitStack) -> OsCase:
    (tmp / "link").symlink_to(tmp / "gone" / "away")
    data = tmp / "link" / "data"
    return {"avatars": {"data_dir": str(data)}}, "avatars.data_dir", str(data), None


def data_dir_cache_is_a_file(tmp: Path, stack: contextlib.ExitStack) -> OsCase:
    data = tmp / "data"
    data.mkdir()
    (data / "cache").write_text("where the render cache folder should be")
    return {"avatars": {"data_dir": str(data)}}, "avatars.data_dir", str(data), None


def host_does_not_resolve(tmp: Path, stack: contextlib.ExitStack) -> OsCase:
    host = "no-such-host.invalid"  # RFC 6761: never resolves
    config = {"server": {"host": host}, "avatars": {"data_dir": str(tmp / "data")}}
    return config, "server.host", host, None


def host_not_on_this_machine(tmp: Path, stack: contextlib.ExitStack) -> OsCase:
    host = "192.0.2.55"  # TEST-NET-1: no interface here has it
    config = {"server": {"host": host}, "avatars": {"data_dir": str(tmp / "data")}}
    return config, "server.host", host, None


def port_in_use(tmp: Path, stack: contextlib.ExitStack) -> OsCase:
    taken = stack.enter_context(socket.socket())
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    return {"avatars": {"data_dir": str(tmp / "data")}}, "server.port", str(port), port


OS_CASES: dict[str, Callable[[Path, contextlib.ExitStack], OsCase]] = {
    "data-dir-below-a-file": data_dir_below_a_file,
    "data-dir-is-a-file": data_dir_is_a_file,
    "data-dir-below-a-dangling-link": data_dir_below_a_dangling_link,
    "data-dir-cache-is-a-file": data_dir_cache_is_a_file,
    "host-does-not-resolve": host_does_not_resolve,
    "host-not-on-this-machine": host_not_on_this_machine,
    "port-in-use": port_in_use,
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(OS_CASES))
def test_an_os_error_at_start_up_names_the_setting_and_its_value(case, tmp_path):
    """Not a bare ``[Errno 20] Not a directory`` or resolver message: the line says which
    setting to change, and what it holds now."""
    with contextlib.ExitStack() as stack:
        config, setting, value, port = OS_CASES[case](tmp_path, stack)
        line = failed_start_line(tmp_path, config, port)
    assert line.startswith(f"start-up failed: {setting}: "), line
    assert value in line, line
