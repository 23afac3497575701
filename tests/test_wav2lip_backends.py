"""Wav2Lip backends (``lipsync.device`` / ``lipsync.precision``) on the random-weight network
of the real architecture: what each choice really runs, clean fallbacks (no OpenVINO, no bf16
on the CPU, no GPU), and every backend's output against ONNX Runtime fp32 on real inputs
(face crops of the default avatar, mel windows of the bundled voice).

Tolerances (absolute, outputs in 0..1; measured on the 2-core CI machine with AVX512-BF16:
bf16 mean 0.006 / p99 0.024 / max 0.075, int8 mean 0.022 / p99 0.083 / max 0.23):

=========  ========  ======  ======
precision  mean      p99     max
=========  ========  ======  ======
fp32       1e-5      1e-4    1e-3
bf16       0.012     0.05    0.15
int8       0.04      0.15    0.40
=========  ========  ======  ======

Random weights give an image of noise, so these bound numerical drift only, not how good the
lips look: a real int8 generator can lose quality that no such bound shows (hence opt-in).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.errors import PipelineError
from config import load_settings
from face.library import AvatarLibrary
from pipeline.lipsync import backends, create_lipsync_engine
from pipeline.lipsync.backends import load_runner, openvino_core, ov_precision_hint
from pipeline.lipsync.quantize import (
    CALIBRATION_TEXT,
    Calibration,
    calibration_samples,
    int8_path,
    quantized_model,
)
from pipeline.lipsync.rows import LOWER_ROWS, lower_rows_model
from pipeline.lipsync.wav2lip import Wav2LipModel, load_wav2lip_engine
from pipeline.lipsync.wav2lip_io import FACE_SIZE
from pipeline.tts import PiperTTS

pytest.importorskip("openvino")

TOLERANCE = {"fp32": (1e-5, 1e-4, 1e-3), "bf16": (0.012, 0.05, 0.15), "int8": (0.04, 0.15, 0.40)}


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> Any:
    lib = AvatarLibrary(data_dir=tmp_path_factory.mktemp("data"), width=512, height=512)
    return lib.get("default")


@pytest.fixture(scope="module")
def voice() -> PiperTTS:
    tts = PiperTTS(sample_rate=16_000)
    tts.load()
    return tts


@pytest.fixture(scope="module")
def calls() -> list[int]:
    """One entry per time the calibration data was made."""
    return []


@pytest.fixture(scope="module")
def calibration(avatar: Any, voice: PiperTTS, calls: list[int]) -> Calibration:
    def samples() -> list[tuple[Any, Any]]:
        calls.append(1)
        speech = list(voice.synthesize(CALIBRATION_TEXT))
        return calibration_samples(avatar.face, speech, count=48)

    return Calibration(key="test-default|bundled|48", samples=samples)


@pytest.fixture(scope="module")
def real_inputs(avatar: Any, voice: PiperTTS) -> tuple[np.ndarray, np.ndarray]:
    """Other sentences and other moments of the idle motion than the calibration's."""
    speech = list(voice.synthesize("Is this the right way to the station? Thanks, goodbye."))
    pairs = calibration_samples(avatar.face, speech, count=24)
    mel = np.stack([m for m, _ in pairs])[:, None]
    face = np.stack([f[:, ::-1].copy() for _, f in pairs])  # mirrored: unseen crops
    return mel.astype(np.float32), face.astype(np.float32)


@pytest.fixture(scope="module")
def reference(wav2lip_onnx: Path, real_inputs: Any, tmp_path_factory: Any) -> np.ndarray:
    runner = load_runner(
        wav2lip_onnx, device="cpu", precision="fp32", fp16=False, intra_op_threads=0,
        cache_dir=tmp_path_factory.mktemp("ref"),
    )
    assert runner.backend == "onnxruntime" and runner.precision == "fp32"
    out = runner.run(*real_inputs)
    assert out.shape == (24, 3, FACE_SIZE, FACE_SIZE)
    assert out.std() > 0.02  # a live output, not a constant that any backend would match
    return out


def within(out: np.ndarray, ref: np.ndarray, precision: str) -> dict[str, float]:
    d = np.abs(out.astype(np.float64) - ref)
    got = {"mean": float(d.mean()), "p99": float(np.quantile(d, 0.99)), "max": float(d.max())}
    mean, p99, worst = TOLERANCE[precision]
    assert got["mean"] <= mean and got["p99"] <= p99 and got["max"] <= worst, (precision, got)
    return got


class NoBf16Core:
    """A real ``openvino.Core`` that reports a CPU without bf16 (no AVX512-BF16, no AMX)."""

    def __init__(self, core: Any) -> None:
        self._core = core

    def get_property(self, device: str, name: str) -> Any:
        value = self._core.get_property(device, name)
        if name == "OPTIMIZATION_CAPABILITIES":
            return [c for c in value if str(c).upper() != "BF16"]
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


# --------------------------------------------------------------------------- selection


def test_precision_hint_follows_the_cpu() -> None:
    assert ov_precision_hint("auto", True) == "bf16"
    assert ov_precision_hint("auto", False) == "f32"
    assert ov_precision_hint("bf16", False) == "f32"  # falls back, with a warning
    assert ov_precision_hint("fp32", True) == "f32"
    assert ov_precision_hint("int8", True) == "bf16"  # the layers int8 leaves out


def test_auto_picks_openvino_and_reports_what_ran(wav2lip_onnx: Path, tmp_path: Path) -> None:
    core = openvino_core()
    assert core is not None
    model = Wav2LipModel(wav2lip_onnx, device="auto", cache_dir=tmp_path)
    assert model.backend == "openvino" and model.providers == ["OpenVINO:CPU"]
    assert not model.gpu
    expected = "bf16" if backends.cpu_bf16(core) else "fp32"
    assert model.precision == expected  # read back from the compiled model
    out = model.run(
        np.zeros((3, 1, 80, 16), np.float32), np.zeros((3, 6, FACE_SIZE, FACE_SIZE), np.float32)
    )
    assert out.shape == (3, 3, FACE_SIZE, FACE_SIZE) and out.dtype == np.float32


def test_cpu_device_is_plain_onnx_runtime_fp32(
    wav2lip_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        model = Wav2LipModel(wav2lip_onnx, device="cpu", precision="bf16", cache_dir=tmp_path)
    assert model.backend == "onnxruntime" and model.providers == ["CPUExecutionProvider"]
    assert model.precision == "fp32"
    assert "needs OpenVINO" in caplog.text


def test_without_openvino_auto_falls_back_and_openvino_is_a_clear_error(
    wav2lip_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    assert openvino_core() is None
    model = Wav2LipModel(wav2lip_onnx, device="auto", cache_dir=tmp_path)
    assert model.backend == "onnxruntime" and model.precision == "fp32"
    with pytest.raises(PipelineError, match=r"lipsync.device is openvino .*pip install openvino"):
        Wav2LipModel(wav2lip_onnx, device="openvino", cache_dir=tmp_path)


def test_a_cpu_without_bf16_runs_fp32(
    wav2lip_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = openvino_core()
    monkeypatch.setattr(backends, "openvino_core", lambda: NoBf16Core(real))
    auto = Wav2LipModel(wav2lip_onnx, device="openvino", precision="auto", cache_dir=tmp_path)
    assert auto.backend == "openvino" and auto.precision == "fp32"
    with caplog.at_level(logging.WARNING):
        asked = Wav2LipModel(wav2lip_onnx, device="openvino", precision="bf16", cache_dir=tmp_path)
    assert asked.precision == "fp32" and "no bf16 support" in caplog.text


def test_no_gpu_means_cuda_is_a_clear_error(wav2lip_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="lipsync.device is cuda"):
        Wav2LipModel(wav2lip_onnx, device="cuda", cache_dir=tmp_path)


def test_engine_auto_uses_wav2lip_only_when_the_cpu_backend_is_fast(
    wav2lip_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def settings(**lipsync: Any) -> Any:
        base = {"engine": "auto", "wav2lip_model": str(wav2lip_onnx),
                "model_cache_dir": str(tmp_path)}
        return load_settings(env={}, overrides={"lipsync": {**base, **lipsync}})

    real = openvino_core()
    bf16 = backends.cpu_bf16(real)
    chosen = create_lipsync_engine(settings())
    try:
        # OpenVINO bf16 carries several sessions on 2 cores; fp32 on the CPU about one
        assert chosen.name == ("wav2lip" if bf16 else "viseme")
        if bf16:
            info = chosen.info()
            assert (info["backend"], info["precision"]) == ("openvino", "bf16")
    finally:
        worker = getattr(chosen, "worker", None)
        if worker is not None:
            worker.close()
    monkeypatch.setattr(backends, "openvino_core", lambda: NoBf16Core(real))
    assert create_lipsync_engine(settings()).name == "viseme"
    assert create_lipsync_engine(settings(device="cpu")).name == "viseme"
    forced = create_lipsync_engine(settings(engine="wav2lip", precision="fp32"))
    assert forced.info()["precision"] == "fp32"
    forced.worker.close()


# --------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_agrees_with_onnx_runtime_fp32(
    precision: str, wav2lip_onnx: Path, tmp_path: Path, real_inputs: Any, reference: np.ndarray
) -> None:
    model = Wav2LipModel(wav2lip_onnx, device="openvino", precision=precision, cache_dir=tmp_path)
    ran = model.precision  # bf16 asked on a CPU without it runs fp32: held to fp32's bound
    assert ran in ("fp32", "bf16") and (precision == "bf16" or ran == "fp32")
    out = model.run(*real_inputs)
    within(out, reference, ran)
    batch_of_one = model.run(real_inputs[0][:1], real_inputs[1][:1])
    within(batch_of_one, reference[:1], ran)  # the batch axis changes nothing


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_the_lower_rows_copy_agrees_with_the_whole_model_where_it_is_exact(
    precision: str, wav2lip_onnx: Path, tmp_path: Path, real_inputs: Any, reference: np.ndarray,
    calibration: Calibration,
) -> None:
    """What the engine runs by default (``lipsync.lower_face_only``) on each OpenVINO
    precision, int8 quantized from the lower-rows copy: rows exact_from.. of the crop within
    the precision's tolerance of the whole fp32 model's."""
    lower = lower_rows_model(wav2lip_onnx, tmp_path)
    assert lower is not None
    model = Wav2LipModel(lower, device="openvino", precision=precision, cache_dir=tmp_path,
                         calibration=calibration, rows=LOWER_ROWS)
    model.warm_up(2)  # checks the output's shape against rows
    out = model.run(*real_inputs)
    assert out.shape == (len(reference), 3, LOWER_ROWS.height, FACE_SIZE)
    skip = LOWER_ROWS.exact_from - LOWER_ROWS.first
    within(out[:, :, skip:], reference[:, :, LOWER_ROWS.exact_from :], model.precision)


def test_calibration_pairs_voiced_mels_with_moving_face_crops(calibration: Calibration) -> None:
    samples = calibration.samples()
    assert len(samples) == 48
    mels = np.stack([m for m, _ in samples])
    faces = np.stack([f for _, f in samples])
    assert mels.shape == (48, 80, 16) and faces.shape == (48, 6, FACE_SIZE, FACE_SIZE)
    assert np.isfinite(mels).all() and faces.min() >= 0 and faces.max() <= 1
    # the lower half of the masked input is blank, the reference half is the face
    assert (faces[:, :3, FACE_SIZE // 2 :] == 0).all() and faces[:, 3:].std() > 0.05
    # different sounds and different moments of the idle motion, not one frame repeated
    assert len({m.tobytes() for m in mels}) > 40
    assert np.abs(faces[:, 3:] - faces[:1, 3:]).mean(axis=(1, 2, 3)).max() > 0.005
    # deterministic: the same avatar and voice give the same set (the cache key relies on it)
    again = calibration.samples()
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(samples, again, strict=True))


def test_int8_is_opt_in_calibrated_once_and_within_tolerance(
    wav2lip_onnx: Path, tmp_path: Path, calibration: Calibration, calls: list[int],
    real_inputs: Any, reference: np.ndarray, caplog: pytest.LogCaptureFixture,
) -> None:
    # auto never quantizes, and does not even look at calibration data
    before = len(calls)
    auto = Wav2LipModel(wav2lip_onnx, device="openvino", cache_dir=tmp_path,
                        calibration=calibration)
    assert auto.precision != "int8" and len(calls) == before
    assert not list(tmp_path.glob("*int8*.onnx"))

    with caplog.at_level(logging.WARNING):
        model = Wav2LipModel(wav2lip_onnx, device="openvino", precision="int8",
                             cache_dir=tmp_path, calibration=calibration)
    assert model.precision == "int8" and model.backend == "openvino"
    assert "quality drop" in caplog.text
    cached = int8_path(wav2lip_onnx, tmp_path, calibration.key)
    assert cached.is_file() and len(calls) == before + 1
    # a QDQ model: int8 weights next to their scales
    import onnx

    graph = onnx.load(str(cached), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    within(model.run(*real_inputs), reference, "int8")
    # the second start reuses the cached model: no new calibration
    assert quantized_model(wav2lip_onnx, tmp_path, calibration) == cached
    assert len(calls) == before + 1
    # another calibration source is another file
    other = Calibration(key="other", samples=calibration.samples)
    assert int8_path(wav2lip_onnx, tmp_path, other.key) != cached


def test_int8_without_calibration_is_a_clear_error(wav2lip_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="int8 but no calibration"):
        Wav2LipModel(wav2lip_onnx, device="openvino", precision="int8", cache_dir=tmp_path)


def test_the_engine_batches_on_openvino(wav2lip_onnx: Path, tmp_path: Path) -> None:
    engine = load_wav2lip_engine(
        wav2lip_onnx, cache_dir=tmp_path, device="openvino", precision="fp32", max_batch=4,
        max_wait_ms=50,
    )
    try:
        info = engine.info()
        assert info["backend"] == "openvino" and info["precision"] == "fp32"
        futures = [
            engine.worker.submit(
                (np.zeros((80, 16), np.float32), np.zeros((6, FACE_SIZE, FACE_SIZE), np.float32))
            )
            for _ in range(4)
        ]
        outs = [f.result(timeout=120) for f in futures]
        # by default only the rows the paste uses (pipeline.lipsync.rows)
        assert info["rows"] == {"first": LOWER_ROWS.first, "exact_from": LOWER_ROWS.exact_from}
        assert all(o.shape == (3, LOWER_ROWS.height, FACE_SIZE) for o in outs)
        assert engine.worker.stats.items == 4
    finally:
        engine.worker.close()


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("streams", [1, 2])
def test_openvino_streams_run_batches_at_once_with_the_same_output(
    wav2lip_onnx: Path, real_inputs: Any, reference: np.ndarray, tmp_path: Path, streams: int
) -> None:
    """``lipsync.streams``: 1 is one request on every thread (latency hint); 2 is two
    requests that run two batches at the same time. Either way each call gets its own
    frames back (a request's output buffer is copied before another call can take it)."""
    import threading

    runner = load_runner(
        wav2lip_onnx, device="openvino", precision="fp32", fp16=False, intra_op_threads=0,
        cache_dir=tmp_path, streams=streams,
    )
    assert runner.streams == streams  # read back from the compiled model
    mel, face = real_inputs
    halves = [(mel[:12], face[:12]), (mel[12:], face[12:])]
    outs: list[np.ndarray | None] = [None, None]
    running = 0
    most = 0
    lock = threading.Lock()
    inner = runner._idle  # type: ignore[attr-defined]

    class Counting:
        """The request pool, counting requests taken at once."""

        def get(self) -> Any:
            nonlocal running, most
            req = inner.get()
            with lock:
                running += 1
                most = max(most, running)
            return req

        def put(self, req: Any) -> None:
            nonlocal running
            with lock:
                running -= 1
            inner.put(req)

    runner._idle = Counting()  # type: ignore[attr-defined]
    start = threading.Barrier(2)

    def call(i: int) -> None:
        start.wait(5)
        for _ in range(3):
            outs[i] = runner.run(*halves[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    within(np.concatenate([o for o in outs if o is not None]), reference, "fp32")
    assert most <= streams  # never more requests at once than there are
    if streams == 2:
        assert most == 2  # the two calls did overlap


def test_openvino_auto_streams_follow_the_throughput_hint(
    wav2lip_onnx: Path, tmp_path: Path
) -> None:
    """streams 0: OpenVINO's throughput hint chooses (2 streams of 1 thread on 2 cores), and
    the engine's batch worker has one thread per stream."""
    engine = load_wav2lip_engine(
        wav2lip_onnx, cache_dir=tmp_path, device="openvino", precision="fp32", max_batch=2,
        streams=0,
    )
    try:
        compiled = engine.model.runner._compiled  # type: ignore[attr-defined]
        streams = int(compiled.get_property("NUM_STREAMS"))
        assert streams >= 1
        assert engine.model.runner.streams == streams
        assert engine.worker.workers == streams
        assert engine.info()["streams"] == streams
        assert str(compiled.get_property("PERFORMANCE_HINT")).upper().endswith("THROUGHPUT")
    finally:
        engine.worker.close()


def test_onnx_runtime_runs_one_batch_at_a_time(wav2lip_onnx: Path, tmp_path: Path) -> None:
    engine = load_wav2lip_engine(
        wav2lip_onnx, cache_dir=tmp_path, device="cpu", max_batch=1, streams=2
    )
    try:
        assert engine.model.runner.streams == 1 and engine.worker.workers == 1
    finally:
        engine.worker.close()
