"""A model or avatar that cannot load stops ``python -m rtc_server`` with one clear line.

Each case runs the real server process with a bad config file: it must exit with status 1
and print exactly one ``start-up failed: ...`` line on stderr naming the file and the setting
to change, and no traceback."""

from __future__ import annotations

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


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(CASES))
def test_a_model_that_does_not_load_is_one_clear_line_and_exit_1(case, tmp_path):
    make, setting = CASES[case]
    config, path = make(tmp_path)
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump(merged(
        QUIET, {"server": {"host": "127.0.0.1", "log_level": "warning"}}, config
    )))
    proc = subprocess.run(
        [sys.executable, "-m", "rtc_server", "--config", str(config_file),
         "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )
    stderr = proc.stderr
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("start-up failed:")]
    assert len(lines) == 1, stderr
    (line,) = lines
    assert setting in line, line
    assert str(path) in line, line
