"""Wav2Lip on the shared inference pool (``lipsync.device: remote``): what a media node sends,
what comes back, and the runner that stands in for a local model.

A node keeps everything but the generator: it renders the idle face, cuts the 96x96 crop,
batches frames from its calls (its ``BatchWorker``, as for a local model), and sends each
batch to the pool (``python -m pipeline.lipsync.serve``), which batches the batches of every
node again (``@serve.batch``) on its device; the mouths come back and are pasted here.

One batch over HTTP (``POST <lipsync.pool_url>``, ``application/octet-stream``):

* request: ``W2L1``, then little-endian uint32 batch size B and mel columns (16), then the
  mel windows (B, 80, 16) float32, then the face crops (B, 96, 96, 3) uint8 BGR. The crops go
  as the bytes they were cut from, not as the model's float input: 4x smaller, and the pool
  rebuilds the input with the same arithmetic (``model_input``), so it is exact.
* answer: ``W2P1``, uint32 B and the output rows R, then (B, 3, R, 96) float16 (0..1, BGR);
  float16 keeps the mouths within half a level of 255 of the float32 output.

``GET <pool_url>`` answers the pool's ``info`` as JSON (backend, precision, rows).
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from common.errors import LipSyncUnavailable, PipelineError
from pipeline.lipsync.mel import MEL_STEP
from pipeline.lipsync.rows import OutputRows
from pipeline.lipsync.wav2lip_io import FACE_SIZE

if TYPE_CHECKING:
    from config.sections import LipsyncSettings
    from pipeline.lipsync.wav2lip import Wav2LipEngine

__all__ = ["RemoteRunner", "decode_answer", "decode_batch", "encode_answer", "encode_batch",
           "remote_wav2lip_engine"]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

BATCH_MAGIC = b"W2L1"
ANSWER_MAGIC = b"W2P1"
HEADER = struct.Struct("<4sII")
MEL_BINS = 80
DEFAULT_STREAMS = 4  # batches a node keeps in flight to the pool


def faces_u8(face: F32) -> U8:
    """The uint8 crops (B, 96, 96, 3) a batch's model input (B, 6, 96, 96) was made from
    (its second half is the crop / 255)."""
    ref = face[:, 3:6].transpose(0, 2, 3, 1)
    return np.ascontiguousarray(np.rint(ref * 255.0).astype(np.uint8))


def encode_batch(mel: F32, face: F32) -> bytes:
    """``mel`` (B, 1, 80, 16), ``face`` (B, 6, 96, 96): the model's inputs."""
    b = mel.shape[0]
    mels = np.ascontiguousarray(mel.reshape(b, MEL_BINS, MEL_STEP), dtype="<f4")
    return HEADER.pack(BATCH_MAGIC, b, MEL_STEP) + mels.tobytes() + faces_u8(face).tobytes()


def decode_batch(body: bytes) -> tuple[F32, F32]:
    """The model's inputs ``(mel (B, 1, 80, 16), face (B, 6, 96, 96))`` from a request body;
    ValueError when it is not one."""
    from pipeline.lipsync.wav2lip_io import model_input

    if len(body) < HEADER.size:
        raise ValueError("body too short")
    magic, b, cols = HEADER.unpack_from(body)
    mel_bytes = b * MEL_BINS * cols * 4
    face_bytes = b * FACE_SIZE * FACE_SIZE * 3
    if magic != BATCH_MAGIC or cols != MEL_STEP or not 1 <= b <= 1024:
        raise ValueError("not a Wav2Lip batch")
    if len(body) != HEADER.size + mel_bytes + face_bytes:
        raise ValueError(f"a batch of {b} frames must be {HEADER.size + mel_bytes + face_bytes} "
                         f"bytes, not {len(body)}")
    mel = np.frombuffer(body, "<f4", b * MEL_BINS * cols, HEADER.size)
    crops = np.frombuffer(body, np.uint8, face_bytes, HEADER.size + mel_bytes)
    crops = crops.reshape(b, FACE_SIZE, FACE_SIZE, 3)
    face = np.stack([model_input(c) for c in crops])
    return mel.reshape(b, 1, MEL_BINS, cols).astype(np.float32), face


def encode_answer(pred: F32) -> bytes:
    b, _, rows, _ = pred.shape
    return HEADER.pack(ANSWER_MAGIC, b, rows) + np.ascontiguousarray(pred, dtype="<f2").tobytes()


def decode_answer(body: bytes, batch: int) -> F32:
    if len(body) < HEADER.size:
        raise PipelineError("the inference pool's answer is empty")
    magic, b, rows = HEADER.unpack_from(body)
    size = HEADER.size + b * 3 * rows * FACE_SIZE * 2
    if magic != ANSWER_MAGIC or b != batch or len(body) != size:
        raise PipelineError("the inference pool's answer is not the batch it was sent")
    out = np.frombuffer(body, "<f2", b * 3 * rows * FACE_SIZE, HEADER.size)
    return out.reshape(b, 3, rows, FACE_SIZE).astype(np.float32)


class RemoteRunner:
    """A ``Runner`` whose ``run`` is one HTTP round trip to the pool (blocking: the batching
    worker's threads call it, ``streams`` at a time)."""

    inputs = ["face", "mel"]
    threads = 0

    def __init__(self, url: str, *, timeout_s: float, streams: int = DEFAULT_STREAMS,
                 info: dict[str, Any] | None = None) -> None:
        import urllib3

        self.url = url
        self.timeout_s = timeout_s
        self.streams = max(1, streams)
        self._http = urllib3.PoolManager(maxsize=self.streams, retries=False,
                                         timeout=urllib3.Timeout(total=timeout_s))
        self.info = info if info is not None else self.fetch_info()
        self.backend = "remote"
        self.providers = [f"{self.info.get('backend')}@{url}"]
        self.gpu = bool(self.info.get("gpu"))
        self.precision = str(self.info.get("precision", "?"))

    def fetch_info(self) -> dict[str, Any]:
        try:
            resp = self._http.request("GET", self.url)
        except Exception as exc:  # noqa: BLE001 - whatever urllib3 raises: one clear error
            raise PipelineError(f"lipsync.pool_url: the inference pool at {self.url} does "
                                f"not answer ({exc}); start it (python -m "
                                "pipeline.lipsync.serve) or fix the URL") from None
        if resp.status != 200:
            raise PipelineError(f"lipsync.pool_url: {self.url} answered {resp.status}, not the "
                                "pool's info; check the URL (it ends in /wav2lip)")
        info = json.loads(resp.data)
        if not isinstance(info, dict) or "rows" not in info:
            raise PipelineError(f"lipsync.pool_url: {self.url} is not a Wav2Lip pool")
        return info

    @property
    def rows(self) -> OutputRows:
        r = self.info["rows"]
        return OutputRows(first=int(r["first"]), exact_from=int(r["exact_from"]))

    def run(self, mel: F32, face: F32) -> F32:
        try:
            resp = self._http.request("POST", self.url, body=encode_batch(mel, face),
                                      headers={"Content-Type": "application/octet-stream"})
        except Exception as exc:  # noqa: BLE001 - timeouts, refused connections: away for now
            raise LipSyncUnavailable(f"the inference pool did not answer: {exc}") from None
        if resp.status != 200:
            raise LipSyncUnavailable(f"the inference pool answered {resp.status}: "
                                     f"{resp.data[:200]!r}")
        return decode_answer(resp.data, mel.shape[0])


def remote_wav2lip_engine(lipsync: LipsyncSettings) -> Wav2LipEngine:
    """The Wav2Lip engine for ``lipsync.device: remote`` (blocking: asks the pool what it
    runs, then warms up through it)."""
    from pipeline.lipsync.wav2lip import Wav2LipEngine, Wav2LipModel

    assert lipsync.pool_url
    runner = RemoteRunner(lipsync.pool_url, timeout_s=lipsync.pool_timeout_ms / 1000.0,
                          streams=lipsync.streams or DEFAULT_STREAMS)
    model = Wav2LipModel(Path(str(runner.info.get("model", "remote"))), runner=runner,
                         rows=runner.rows)
    model.warm_up()
    logger.info("Wav2Lip on the inference pool at %s: %s", lipsync.pool_url, runner.info)
    return Wav2LipEngine(model, max_batch=lipsync.max_batch, max_wait_ms=lipsync.max_wait_ms,
                         frame_group=lipsync.frame_group, render_lead_ms=lipsync.render_lead_ms,
                         schedule_lead_ms=lipsync.schedule_lead_ms)
