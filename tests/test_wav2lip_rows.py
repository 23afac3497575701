"""Wav2Lip run only on the crop's rows the paste uses (``pipeline.lipsync.rows``): the rewritten
graph's rows from ``exact_from`` equal the whole model's, the masks never reach above them, and
what reaches the frame is what the whole model would have pasted there."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from avatars import DEFAULT_AVATAR_DIR, load_avatar_dir
from common.errors import PipelineError
from face import FaceRenderer, IdleTimeline
from pipeline.lipsync.rows import (
    LOWER_ROWS,
    START_12,
    WHOLE_CROP,
    lower_rows_model,
    lower_rows_path,
    slice_graph,
)
from pipeline.lipsync.wav2lip import load_wav2lip_engine
from pipeline.lipsync.wav2lip_io import FACE_SIZE, crop_face, face_geometry, model_input, paste
from pipeline.lipsync.wav2lip_model import INPUT_NAMES, OUTPUT_NAMES


def run_onnx(path: Path, mel: np.ndarray, face: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"mel": mel, "face": face})[0]


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    mel = rng.standard_normal((3, 1, 80, 16)).astype(np.float32)
    face = rng.random((3, 6, FACE_SIZE, FACE_SIZE)).astype(np.float32)
    face[:, :3, FACE_SIZE // 2 :] = 0.0
    return mel, face


@pytest.fixture(scope="module")
def lower(wav2lip_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = lower_rows_model(wav2lip_onnx, tmp_path_factory.mktemp("rows"))
    assert path is not None
    return path


def test_the_rewritten_graph_gives_the_whole_models_rows_from_exact_from(
    wav2lip_onnx: Path, lower: Path, inputs: Any
) -> None:
    whole = run_onnx(wav2lip_onnx, *inputs)
    part = run_onnx(lower, *inputs)
    assert whole.shape == (3, 3, FACE_SIZE, FACE_SIZE)
    assert part.shape == (3, 3, FACE_SIZE - LOWER_ROWS.first, FACE_SIZE)
    per_row = np.abs(part - whole[:, :, LOWER_ROWS.first :]).max(axis=(0, 1, 3))
    skip = LOWER_ROWS.exact_from - LOWER_ROWS.first
    assert per_row[skip:].max() <= 1e-5  # the same computation on the same numbers
    # and exact_from is the first such row: the one above it sees the cut's zero padding
    assert per_row[skip - 1] > 1e-4
    assert whole.std() > 0.02  # a live network, not a constant


def test_the_24x24_stage_runs_only_its_rows_and_one_more_row_off_would_be_inexact(
    wav2lip_onnx: Path, lower: Path, inputs: Any, tmp_path: Path
) -> None:
    import onnx
    from onnx import shape_inference

    # the transposed convolution to 24x24 (256 channels) computes rows 2 * START_12 .. 23
    graph = shape_inference.infer_shapes(onnx.load(str(lower))).graph
    shapes = {
        v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in graph.value_info
    }
    to_24 = [
        shapes.get(n.output[0], ())[1:]
        for n in graph.node
        if n.op_type == "ConvTranspose" and shapes.get(n.output[0], ())[1:2] == (256,)
    ]
    assert to_24 == [(256, 24 - 2 * START_12, 24)]
    # START_12 is the last exact cut: one row further and rows from exact_from change
    proto = onnx.load(str(wav2lip_onnx))
    assert slice_graph(proto, start_12=START_12 + 1)
    further = tmp_path / "further.onnx"
    onnx.save(proto, str(further))
    whole = run_onnx(wav2lip_onnx, *inputs)
    part = run_onnx(further, *inputs)
    skip = LOWER_ROWS.exact_from - LOWER_ROWS.first
    assert np.abs(part[:, :, skip:] - whole[:, :, LOWER_ROWS.exact_from :]).max() > 1e-3


def test_the_copy_is_cached_and_a_changed_model_gets_a_new_one(
    wav2lip_onnx: Path, tmp_path: Path
) -> None:
    source = tmp_path / "w.onnx"
    source.write_bytes(wav2lip_onnx.read_bytes())
    cache = tmp_path / "cache"
    first = lower_rows_model(source, cache)
    assert first == lower_rows_path(source, cache) and first is not None and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert lower_rows_model(source, cache) == first and first.stat().st_mtime_ns == stamp
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    second = lower_rows_model(source, cache)
    assert second is not None and second != first and second.is_file()
    assert not list(cache.glob(".*.tmp"))  # written atomically, nothing left behind


class NotWav2Lip(torch.nn.Module):
    """Wav2Lip's inputs and output, but another graph (no decoder concatenations)."""

    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(face[:, 3:] + mel.mean())


class HalfCrop(torch.nn.Module):
    """Wav2Lip's names, but only half the crop's rows come out."""

    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(face[:, 3:, 48:] + mel.mean())


def export(module: torch.nn.Module, path: Path) -> Path:
    torch.onnx.export(
        module,
        (torch.zeros(1, 1, 80, 16), torch.zeros(1, 6, FACE_SIZE, FACE_SIZE)),
        str(path),
        dynamo=False,
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        dynamic_axes={n: {0: "batch"} for n in INPUT_NAMES + OUTPUT_NAMES},
    )
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter
def test_a_graph_without_wav2lips_decoder_runs_the_whole_crop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = export(NotWav2Lip(), tmp_path / "other.onnx")
    with caplog.at_level(logging.WARNING):
        assert lower_rows_model(path, tmp_path / "cache") is None
        engine = load_wav2lip_engine(path, cache_dir=tmp_path / "cache", device="cpu")
    try:
        assert "running the whole crop" in caplog.text
        assert engine.model.rows == WHOLE_CROP
        assert engine.info()["rows"] == {"first": 0, "exact_from": 0}
        out = engine.model.run(
            np.zeros((2, 1, 80, 16), np.float32), np.zeros((2, 6, 96, 96), np.float32)
        )
        assert out.shape == (2, 3, FACE_SIZE, FACE_SIZE)
    finally:
        engine.worker.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter
def test_a_model_with_another_output_shape_is_a_clear_error(tmp_path: Path) -> None:
    path = export(HalfCrop(), tmp_path / "half.onnx")
    with pytest.raises(PipelineError, match=r"outputs \(1, 3, 48, 96\).*expected \(1, 3, 96, 96\)"):
        load_wav2lip_engine(path, cache_dir=tmp_path / "cache", device="cpu")


def test_lower_face_only_false_runs_the_whole_crop(wav2lip_onnx: Path, tmp_path: Path) -> None:
    engine = load_wav2lip_engine(
        wav2lip_onnx, cache_dir=tmp_path, device="cpu", lower_face_only=False
    )
    try:
        assert engine.model.rows == WHOLE_CROP and engine.model.path == wav2lip_onnx
        assert not list(tmp_path.glob("*rows*.onnx"))
    finally:
        engine.worker.close()


# --------------------------------------------------------------------------- the paste


def cubic_rows_read(side: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row of a ``side``-tall paste, the lowest and highest row of the 96 that cv2's
    bicubic resize reads (by experiment: a resize of one-hot rows)."""
    lo = np.full(side, FACE_SIZE)
    hi = np.full(side, -1)
    for r in range(FACE_SIZE):
        probe = np.zeros((FACE_SIZE, FACE_SIZE), np.float32)
        probe[r] = 1.0
        big = cv2.resize(probe, (side, side), interpolation=cv2.INTER_CUBIC)
        reached = np.nonzero(np.abs(big[:, side // 2]) > 0)[0]
        lo[reached] = np.minimum(lo[reached], r)
        hi[reached] = np.maximum(hi[reached], r)
    return lo, hi


def landmarks(avatar: Any, nose_up: float) -> np.ndarray:
    """The avatar's landmarks; ``nose_up`` > 0 raises the nose's points by that share of the
    face's height, so the mask (which covers the nose tip) reaches far above row 39."""
    lm = np.array(avatar.landmarks, dtype=np.float64)
    height = lm[:, 1].max() - lm[:, 1].min()
    lm[27:36, 1] -= nose_up * height
    return lm


@pytest.mark.parametrize("nose_up", [0.0, 0.2])
@pytest.mark.parametrize("size", [(512, 512), (1280, 720), (256, 256)])
def test_the_mask_stays_below_the_rows_the_model_computes_exactly(
    size: tuple[int, int], nose_up: float
) -> None:
    w, h = size
    avatar = load_avatar_dir(DEFAULT_AVATAR_DIR, width=w, height=h)
    lm = landmarks(avatar, nose_up)
    whole = face_geometry(lm, w, h)
    geo = face_geometry(lm, w, h, exact_from=LOWER_ROWS.exact_from)
    assert (geo.x0, geo.y0, geo.side) == (whole.x0, whole.y0, whole.side)
    lo, _ = cubic_rows_read(geo.side)
    reaches_above = lo < LOWER_ROWS.exact_from
    assert reaches_above.any()
    assert (geo.mask[reaches_above] == 0).all()  # no pasted pixel reads an inexact row
    assert (geo.mask <= whole.mask + 1e-7).all()  # only ever less, never more
    # from 5 rows (of 96) below that, the mask is the one a whole-crop model gets
    below = (np.arange(geo.side) + 0.5) * FACE_SIZE / geo.side - 0.5 >= LOWER_ROWS.exact_from + 5
    assert np.array_equal(geo.mask[below], whole.mask[below])
    if nose_up == 0:  # the default avatar: only the faint top of the feathering fades out
        assert 1.0 - geo.mask.sum() / whole.mask.sum() < 0.02


@pytest.mark.parametrize("nose_up", [0.0, 0.2])
def test_what_reaches_the_frame_is_what_the_whole_model_pastes(
    wav2lip_onnx: Path, lower: Path, nose_up: float
) -> None:
    """The same frame, the same mask: pasting the lower-rows model's output gives the pixels
    pasting the whole model's output gives, on a real avatar crop."""
    avatar = load_avatar_dir(DEFAULT_AVATAR_DIR, width=512, height=512)
    rgb = FaceRenderer(avatar).render(IdleTimeline(seed=1).pose_at(0))
    geo = face_geometry(landmarks(avatar, nose_up), 512, 512, exact_from=LOWER_ROWS.exact_from)
    face = model_input(crop_face(rgb, geo))[None]
    mel = np.random.default_rng(3).standard_normal((1, 1, 80, 16)).astype(np.float32)
    whole = run_onnx(wav2lip_onnx, mel, face)[0]
    part = run_onnx(lower, mel, face)[0]
    got = paste(rgb, part, geo, 1.0)
    want = paste(rgb, whole, geo, 1.0)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.abs(got.astype(int) - rgb.astype(int)).max() > 20  # the mouth really changed
