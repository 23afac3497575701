"""Where the Wav2Lip generator runs: ONNX Runtime (TensorRT, CUDA or its CPU provider) or
OpenVINO on the CPU.

``lipsync.device``:

- ``auto``: a GPU through ONNX Runtime when one is really active (TensorRT, then CUDA; the
  ``onnxruntime-gpu`` wheel lists its CUDA providers even without CUDA, so the session's
  ``get_providers()`` decides), else OpenVINO when the ``openvino`` package imports, else plain
  ONNX Runtime on the CPU;
- ``cuda``: a GPU or a clear error;
- ``openvino``: OpenVINO or a clear error;
- ``cpu``: plain ONNX Runtime on the CPU, fp32.

``lipsync.precision`` applies to OpenVINO: ``auto`` is bf16 where the CPU has it (OpenVINO's
``OPTIMIZATION_CAPABILITIES`` lists ``BF16``: AVX512-BF16 or AMX), else fp32; ``bf16`` on a CPU
without it falls back to fp32 with a warning; ``int8`` runs a statically quantized copy of the
model (``pipeline.lipsync.quantize``). What actually ran is read back from the compiled model
and reported, never assumed. Measured on this repository's 2-core CI machine (AVX512-BF16, no
AMX), random-weight Wav2Lip, model alone: ONNX Runtime fp32 34-36 frames/s, ONNX Runtime's own
OpenVINO execution provider (``onnxruntime-openvino`` 1.24) fp32 43 frames/s and no bf16 on the
CPU, the ``openvino`` package fp32 44-48, bf16 82-97, int8 110-149 frames/s: hence the package.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from common.errors import PipelineError
from common.threads import os_thread_named

logger = logging.getLogger(__name__)
# the OS name of the threads a backend's runtime starts for the model (``bench.profile_call``
# counts their CPU as the model's)
MODEL_THREADS = "model"


def derived_model_path(model: Path, cache_dir: Path, tag: str, key: str) -> Path:
    """Where a copy made from ``model`` (quantized, rewritten, ...) is cached:
    ``cache_dir/<stem>-<tag>-<digest>.onnx``, the digest over the model's resolved path, size
    and mtime and ``key`` (what else the copy depends on), so a changed model or recipe gets
    a new file."""
    st = model.stat()
    ident = f"{model.resolve()}|{st.st_size}|{st.st_mtime_ns}|{key}"
    digest = hashlib.sha1(ident.encode()).hexdigest()[:12]
    return cache_dir / f"{model.stem}-{tag}-{digest}.onnx"

F32 = npt.NDArray[np.float32]

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_ORT_ORDER = {
    "auto": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "cuda": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}
_OV_PRECISION = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
OPENVINO_HINT = "pip install openvino==2026.4.1 (it is in requirements.txt)"


class Runner(Protocol):
    """One loaded generator: ``run(mel, face)`` on batches, and what it really runs on."""

    backend: str  # "onnxruntime" or "openvino"
    providers: list[str]  # ONNX Runtime providers in use, or ["OpenVINO:CPU"]
    gpu: bool
    precision: str  # fp32, fp16, bf16 or int8
    inputs: list[str]  # the model's input names
    threads: int  # threads of the runtime, all requests together (0: the runtime's default)
    streams: int  # runs that may go on at the same time (``run`` is safe from that many threads)

    def run(self, mel: F32, face: F32) -> F32: ...


def choose_providers(device: str, available: Sequence[str]) -> list[str]:
    """ONNX Runtime providers to ask for, best first, among those this build has."""
    order = _ORT_ORDER.get(device, _ORT_ORDER["cpu"])
    return [p for p in order if p in available] or ["CPUExecutionProvider"]


def openvino_core() -> Any | None:
    """An ``openvino.Core``, or None when the package is not installed or does not load."""
    try:
        import openvino as ov
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native library
        logger.debug("openvino unavailable: %r", exc)
        return None
    return ov.Core()


def cpu_bf16(core: Any) -> bool:
    """Whether OpenVINO can run bf16 on this CPU (AVX512-BF16 or AMX)."""
    try:
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no CPU plugin: no bf16
        return False
    return "BF16" in [str(c).upper() for c in caps]


def ov_precision_hint(requested: str, bf16_ok: bool) -> str:
    """OpenVINO's ``INFERENCE_PRECISION_HINT`` for ``lipsync.precision``.

    int8 models keep their quantized layers in int8 whatever the hint; the hint sets the
    precision of the rest (bf16 where the CPU has it)."""
    if requested == "fp32":
        return "f32"
    if requested == "bf16" and not bf16_ok:
        logger.warning(
            "lipsync.precision is bf16 but this CPU has no bf16 support (AVX512-BF16 or AMX); "
            "running Wav2Lip in fp32"
        )
    return "bf16" if bf16_ok else "f32"


class OrtRunner:
    """An ONNX Runtime session (TensorRT, CUDA or CPU provider)."""

    backend = "onnxruntime"

    def __init__(
        self,
        model_file: Path,
        *,
        providers: Sequence[str],
        fp16: bool,
        intra_op_threads: int,
        cache_dir: Path,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        # idle intra-op threads sleep instead of spinning: between batches the cores belong
        # to rendering, encoding and the other calls
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        provider_opts: list[tuple[str, dict[str, Any]] | str] = []
        for p in providers:
            if p == "TensorrtExecutionProvider":
                provider_opts.append(
                    (
                        p,
                        {
                            "trt_fp16_enable": bool(fp16),
                            "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": str(cache_dir / "trt"),
                        },
                    )
                )
            else:
                provider_opts.append(p)
        with os_thread_named(MODEL_THREADS):  # its thread pool is named so
            self._session = ort.InferenceSession(
                str(model_file), sess_options=opts, providers=provider_opts
            )
        self.providers: list[str] = list(self._session.get_providers())
        self.gpu = self.providers[0] in GPU_PROVIDERS
        self.precision = ("fp16" if fp16 else "fp32") if self.gpu else "fp32"
        self.inputs = [i.name for i in self._session.get_inputs()]
        self.threads = intra_op_threads
        self.streams = 1
        self._lock = threading.Lock()

    def run(self, mel: F32, face: F32) -> F32:
        with self._lock:
            (out,) = self._session.run(["frames"], {"mel": mel, "face": face})
        return np.asarray(out, dtype=np.float32)


class OpenVinoRunner:
    """The generator compiled by OpenVINO for the CPU; the batch axis stays dynamic.

    ``streams``: 1 is the latency hint (one batch at a time on every thread); N > 1 is N
    streams that run N batches at once on a share of the threads each; 0 lets OpenVINO's
    throughput hint choose (on 2 cores: 2 streams of 1 thread). ``run`` is safe from
    ``self.streams`` threads at once: each takes an idle inference request of its own.

    Why streams (measured on 2 cores, bf16, batches of 2-4): the model alone costs about
    the same CPU per frame either way (20-22 ms), but beside rendering, encoding and the
    other calls a 2-thread request waits at every layer for its thread that was preempted;
    two 1-thread streams never wait for each other."""

    backend = "openvino"
    gpu = False

    def __init__(
        self,
        core: Any,
        model_file: Path,
        *,
        precision_hint: str,
        int8: bool,
        intra_op_threads: int,
        cache_dir: Path | None,
        streams: int = 0,
    ) -> None:
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
            "INFERENCE_PRECISION_HINT": precision_hint,
        }
        if streams > 1:
            config["NUM_STREAMS"] = streams
        if intra_op_threads:
            config["INFERENCE_NUM_THREADS"] = intra_op_threads
        if cache_dir is not None:
            # compiled blobs are cached: later start-ups skip most of the compile time
            cache_dir.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        model = core.read_model(str(model_file))
        self.inputs = [p.get_any_name() for p in model.inputs]
        with os_thread_named(MODEL_THREADS):  # its inference streams are named so
            self._compiled = core.compile_model(model, "CPU", config)
        ran = _type_name(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.inference_precision = _OV_PRECISION.get(ran, ran)
        self.precision = "int8" if int8 else self.inference_precision
        self.threads = int(self._compiled.get_property("INFERENCE_NUM_THREADS"))
        self.streams = max(1, int(self._compiled.get_property("NUM_STREAMS")))
        self.providers = ["OpenVINO:CPU"]
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.streams):
            self._idle.put(self._compiled.create_infer_request())
        self._output = self._compiled.output(0)

    def run(self, mel: F32, face: F32) -> F32:
        request = self._idle.get()  # blocks only when more than ``streams`` threads call
        try:
            result = request.infer({"mel": mel, "face": face})
            # the request reuses its output buffer: copy before another run takes it
            return np.array(result[self._output], dtype=np.float32, copy=True)
        finally:
            self._idle.put(request)


def _type_name(value: Any) -> str:
    """``ov.Type.bf16`` -> ``"bf16"`` (OpenVINO returns a Type object, or a str)."""
    name = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return str(name).lower()


def load_runner(
    path: Path,
    *,
    device: str,
    precision: str,
    fp16: bool,
    intra_op_threads: int,
    cache_dir: Path,
    int8_model: Callable[[], Path] | None = None,
    streams: int = 0,
) -> Runner:
    """The runner ``device`` and ``precision`` ask for (blocking: compiles the model).

    ``int8_model`` is a callable returning the quantized model's path, called only when
    OpenVINO is chosen with ``precision: int8`` (calibration is slow; see
    ``pipeline.lipsync.quantize``). ``streams`` applies to OpenVINO (``OpenVinoRunner``);
    ONNX Runtime runs one batch at a time."""
    import onnxruntime as ort

    if device not in ("auto", "cuda", "openvino", "cpu"):
        raise PipelineError(f"lipsync.device: unknown device {device!r}")
    available = ort.get_available_providers()
    if device in ("auto", "cuda"):
        wanted = choose_providers(device, available)
        if any(p in GPU_PROVIDERS for p in wanted):
            model_file = path
            if (
                fp16
                and "CUDAExecutionProvider" in wanted
                and ("TensorrtExecutionProvider" not in wanted)
            ):
                from pipeline.lipsync.wav2lip_model import fp16_copy

                try:
                    model_file = fp16_copy(path, cache_dir)
                except Exception as exc:  # noqa: BLE001 - fall back to fp32, say so
                    logger.warning("fp16 conversion of %s failed (%s); running fp32", path, exc)
            runner = _ort(model_file, path, wanted, fp16, intra_op_threads, cache_dir)
            if runner.gpu:
                return runner
            logger.info("no GPU provider active for Wav2Lip (onnxruntime: %s)", runner.providers)
            if device == "cuda":
                raise PipelineError(
                    "lipsync.device is cuda but no GPU execution provider is active "
                    f"(onnxruntime uses {runner.providers}; available: {available}); install "
                    "onnxruntime-gpu with CUDA 12 and cuDNN 9, or set lipsync.device: auto"
                )
        elif device == "cuda":
            raise PipelineError(
                "lipsync.device is cuda but this onnxruntime build has no GPU execution "
                f"provider (available: {available}); install onnxruntime-gpu with CUDA 12 and "
                "cuDNN 9, or set lipsync.device: auto"
            )
    if device in ("auto", "openvino"):
        core = openvino_core()
        if core is not None:
            return _openvino(
                core, path, precision, intra_op_threads, cache_dir, int8_model, streams
            )
        if device == "openvino":
            raise PipelineError(
                "lipsync.device is openvino but the openvino package is not installed or does "
                f"not load; {OPENVINO_HINT}, or set lipsync.device: cpu"
            )
        logger.info("openvino is not installed: Wav2Lip runs on plain ONNX Runtime (fp32)")
    if precision in ("bf16", "int8"):
        logger.warning(
            "lipsync.precision %s needs OpenVINO; plain ONNX Runtime on the CPU runs fp32",
            precision,
        )
    return _ort(path, path, ["CPUExecutionProvider"], False, intra_op_threads, cache_dir)


def _ort(
    model_file: Path,
    path: Path,
    providers: Sequence[str],
    fp16: bool,
    intra_op_threads: int,
    cache_dir: Path,
) -> OrtRunner:
    try:
        return OrtRunner(
            model_file,
            providers=providers,
            fp16=fp16,
            intra_op_threads=intra_op_threads,
            cache_dir=cache_dir,
        )
    except Exception as exc:
        raise PipelineError(
            f"lipsync.wav2lip_model: cannot load {path} with onnxruntime ({exc}); point it at "
            "the Wav2Lip generator weights (wav2lip_gan.pth or their ONNX export), or set "
            "lipsync.engine: viseme"
        ) from exc


def _openvino(
    core: Any,
    path: Path,
    precision: str,
    intra_op_threads: int,
    cache_dir: Path,
    int8_model: Callable[[], Path] | None,
    streams: int,
) -> OpenVinoRunner:
    bf16_ok = cpu_bf16(core)
    hint = ov_precision_hint(precision, bf16_ok)
    model_file, int8 = path, False
    if precision == "int8":
        if int8_model is None:
            raise PipelineError(
                "lipsync.precision is int8 but no calibration data was given (the server "
                "calibrates on the default avatar and voice)"
            )
        model_file, int8 = int8_model(), True
        logger.warning(
            "Wav2Lip runs statically quantized to int8 (lipsync.precision: int8): published "
            "work on compressed Wav2Lip reports a clear quality drop for a fully int8 "
            "generator; check the lips, or use precision auto (bf16/fp32)"
        )
    try:
        return OpenVinoRunner(
            core,
            model_file,
            precision_hint=hint,
            int8=int8,
            intra_op_threads=intra_op_threads,
            cache_dir=cache_dir / "openvino",
            streams=streams,
        )
    except Exception as exc:
        raise PipelineError(
            f"lipsync.wav2lip_model: cannot load {path} with OpenVINO ({exc}); point it at "
            "the Wav2Lip generator weights (wav2lip_gan.pth or their ONNX export), set "
            "lipsync.device: cpu, or lipsync.engine: viseme"
        ) from exc
