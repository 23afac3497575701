"""The Wav2Lip generator: official layout, ONNX export equal to torch, checkpoint resolution."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from common.errors import PipelineError
from pipeline.lipsync import wav2lip_model
from pipeline.lipsync.wav2lip_model import (
    ModelError,
    build_random_wav2lip,
    load_checkpoint_state,
    resolve_wav2lip_model,
    write_random_wav2lip_checkpoint,
)
from pipeline.lipsync.wav2lip_net import Wav2LipGenerator


@pytest.fixture(scope="module")
def generator() -> Wav2LipGenerator:
    return Wav2LipGenerator().eval()


@pytest.fixture(scope="module")
def random_seed0() -> Wav2LipGenerator:
    return build_random_wav2lip(0)


def inputs(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mel = rng.uniform(-4, 4, (batch, 1, 80, 16)).astype(np.float32)
    face = rng.uniform(0, 1, (batch, 6, 96, 96)).astype(np.float32)
    return mel, face


def run_onnx(path: Path, mel: np.ndarray, face: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["frames"], {"mel": mel, "face": face})[0]


def save_official_layout(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


def test_parameter_count(generator: Wav2LipGenerator) -> None:
    n_params = sum(p.numel() for p in generator.parameters())
    assert abs(n_params - 36.3e6) < 0.1e6


def test_official_key_names_and_shapes(generator: Wav2LipGenerator) -> None:
    state = generator.state_dict()
    expected = {
        "audio_encoder.0.conv_block.0.weight": (32, 1, 3, 3),
        "audio_encoder.3.conv_block.0.weight": (64, 32, 3, 3),
        "audio_encoder.12.conv_block.0.weight": (512, 512, 1, 1),
        "audio_encoder.12.conv_block.1.running_var": (512,),
        "face_encoder_blocks.0.0.conv_block.0.weight": (16, 6, 7, 7),
        "face_encoder_blocks.2.3.conv_block.0.weight": (64, 64, 3, 3),
        "face_encoder_blocks.6.1.conv_block.0.weight": (512, 512, 1, 1),
        "face_decoder_blocks.0.0.conv_block.0.weight": (512, 512, 1, 1),
        # ConvTranspose2d weights are (in, out, kh, kw).
        "face_decoder_blocks.1.0.conv_block.0.weight": (1024, 512, 3, 3),
        "face_decoder_blocks.3.0.conv_block.0.weight": (768, 384, 3, 3),
        "face_decoder_blocks.6.0.conv_block.0.weight": (160, 64, 3, 3),
        "face_decoder_blocks.6.2.conv_block.1.num_batches_tracked": (),
        "output_block.0.conv_block.0.weight": (32, 80, 3, 3),
        "output_block.1.weight": (3, 32, 1, 1),
        "output_block.1.bias": (3,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "audio_encoder.13.conv_block.0.weight" not in state
    assert "face_decoder_blocks.7.0.conv_block.0.weight" not in state
    assert len(generator.face_encoder_blocks) == 7 and len(generator.face_decoder_blocks) == 7


def test_forward_shape_and_range(random_seed0: Wav2LipGenerator) -> None:
    mel, face = inputs(2)
    with torch.no_grad():
        frames = random_seed0(torch.from_numpy(mel), torch.from_numpy(face))
    assert frames.shape == (2, 3, 96, 96)
    assert float(frames.min()) >= 0 and float(frames.max()) <= 1
    assert float((frames[0] - frames[1]).abs().mean()) > 0.01  # the inputs matter


def test_onnx_equals_torch_with_dynamic_batch(
    wav2lip_onnx: Path, random_seed0: Wav2LipGenerator
) -> None:
    session = ort.InferenceSession(str(wav2lip_onnx), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[1:]) for i in session.get_inputs()] == [
        ("mel", [1, 80, 16]),
        ("face", [6, 96, 96]),
    ]
    assert [o.name for o in session.get_outputs()] == ["frames"]
    for batch in (1, 5):
        mel, face = inputs(batch, seed=batch)
        with torch.no_grad():
            expected = random_seed0(torch.from_numpy(mel), torch.from_numpy(face)).numpy()
        frames = session.run(["frames"], {"mel": mel, "face": face})[0]
        assert frames.shape == (batch, 3, 96, 96)
        np.testing.assert_allclose(frames, expected, atol=1e-4, rtol=0)


def test_onnx_path_is_checked_and_returned(wav2lip_onnx: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert resolve_wav2lip_model(wav2lip_onnx, cache) == wav2lip_onnx
    assert not cache.exists()


def test_checkpoint_is_exported_once_then_reused(
    tmp_path: Path, random_seed0: Wav2LipGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = write_random_wav2lip_checkpoint(tmp_path / "wav2lip_gan.pth", seed=0)
    saved = torch.load(checkpoint, weights_only=True)
    assert all(k.startswith("module.") for k in saved["state_dict"])
    cache = tmp_path / "cache"

    onnx_path = resolve_wav2lip_model(checkpoint, cache)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    assert onnx_path == cache / f"wav2lip-{digest}.onnx"
    assert sorted(p.name for p in cache.iterdir()) == [onnx_path.name]  # no temp file left
    mel, face = inputs(2)
    with torch.no_grad():
        expected = random_seed0(torch.from_numpy(mel), torch.from_numpy(face)).numpy()
    np.testing.assert_allclose(run_onnx(onnx_path, mel, face), expected, atol=1e-4, rtol=0)

    mtime = onnx_path.stat().st_mtime_ns

    def no_export(*args: object) -> Path:
        raise AssertionError("exported again")

    monkeypatch.setattr(wav2lip_model, "export_onnx", no_export)
    assert resolve_wav2lip_model(checkpoint, cache) == onnx_path
    assert onnx_path.stat().st_mtime_ns == mtime


def test_bare_state_dict_loads(generator: Wav2LipGenerator, tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.save(generator.state_dict(), path)
    state = load_checkpoint_state(path)
    assert state.keys() == generator.state_dict().keys()
    wrapped = save_official_layout(generator.state_dict(), tmp_path / "wrapped.tar")
    assert load_checkpoint_state(wrapped).keys() == state.keys()


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_checkpoint_that_does_not_fit_is_a_model_error(
    generator: Wav2LipGenerator, tmp_path: Path, change: str
) -> None:
    state = dict(generator.state_dict())
    if change == "missing":
        del state["face_decoder_blocks.3.1.conv_block.0.bias"]
    elif change == "extra":
        state["face_decoder_blocks.7.0.conv_block.0.weight"] = torch.zeros(128, 64, 3, 3)
    else:
        state["output_block.1.weight"] = torch.zeros(3, 32, 3, 3)
    path = save_official_layout(state, tmp_path / "wav2lip.pth")
    with pytest.raises(ModelError) as caught:
        resolve_wav2lip_model(path, tmp_path / "cache")
    message = str(caught.value)
    assert str(path) in message and "not a Wav2Lip generator checkpoint" in message
    assert {"missing": "1 missing", "extra": "1 unexpected", "shape": "1 shape"}[change] in message
    assert "wav2lip_gan.pth" in message
    assert caught.value.path == path
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("notes.pth", b"these are not weights\n", "not a readable PyTorch checkpoint"),
        ("empty.pth", b"", "not a readable PyTorch checkpoint"),
        ("model.onnx", b"\x00\x01garbage", "not a readable ONNX file"),
        ("model.bin", b"weights", "unknown suffix '.bin'"),
    ],
)
def test_unusable_files_are_model_errors(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelError, match=expected) as caught:
        resolve_wav2lip_model(path, tmp_path / "cache")
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, PipelineError)


def test_checkpoint_of_something_else_is_a_model_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"global_step": 3, "state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ModelError, match="1 unexpected"):
        resolve_wav2lip_model(path, tmp_path)
    torch.save({"epoch": 3}, path)
    with pytest.raises(ModelError, match="not a tensor"):
        resolve_wav2lip_model(path, tmp_path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter
def test_onnx_with_other_names_is_a_model_error(tmp_path: Path) -> None:
    path = tmp_path / "other.onnx"
    torch.onnx.export(torch.nn.Conv2d(1, 1, 3), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False)
    with pytest.raises(ModelError, match="expected inputs"):
        resolve_wav2lip_model(path, tmp_path)


def test_missing_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_wav2lip_model(tmp_path / "wav2lip_gan.pth", tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint_state(tmp_path / "wav2lip_gan.pth")


def test_cli_reports_a_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        wav2lip_model.main(["export", str(tmp_path / "nope.pth"), str(tmp_path / "out.onnx")])
    assert caught.value.code == 1
    assert "does not exist" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
