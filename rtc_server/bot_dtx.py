"""The bot's microphone sent as a browser sends it when the server's answer asks for Opus DTX
(``usedtx=1``): libopus with DTX on, and WebRTC's rule for what goes on the wire.

With DTX, libopus makes a packet of only its header (1-2 bytes) for each silent frame, and a
comfort-noise update every 400 ms. WebRTC sends the first header-only packet of a run (the
receiver learns that the sender went quiet) and leaves the others out, so a silent person
sends ~2 packets in 400 ms instead of 20. The bench's bots are silent while the avatar talks;
sent this way, they cost the server what a browser's silence costs it."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
from aiortc.codecs.base import Encoder
from av.frame import Frame
from av.packet import Packet

from rtc_server.mic import load_libopus

OPUS_APPLICATION_VOIP = 2048
OPUS_SET_BITRATE_REQUEST = 4002
OPUS_SET_DTX_REQUEST = 4016
HEADER_ONLY_BYTES = 2  # libopus's DTX frames: the packet's header and nothing else
RATE = 48_000
FRAME = 960  # 20 ms


def answer_asks_dtx(sdp: str) -> bool:
    """Whether the SDP's Opus format parameters say ``usedtx=1`` (aiortc's SDP parser)."""
    from aiortc import sdp as aiortc_sdp

    description = aiortc_sdp.SessionDescription.parse(sdp)
    return any(
        str(codec.parameters.get("usedtx")) == "1"
        for media in description.media if media.kind == "audio"
        for codec in media.rtp.codecs if codec.mimeType.lower() == "audio/opus"
    )


class DtxOpusEncoder(Encoder):
    """Mono 48 kHz s16 frames of 20 ms (the bot's ``MicTrack``) to Opus (voip, DTX on):
    one packet a frame, a header-only packet only when the one before was not. ``sent`` and
    ``left_out`` count packets."""

    def __init__(self, bitrate_bps: int = 32_000) -> None:
        lib = load_libopus()
        if lib is None:
            raise RuntimeError("libopus is not available for the DTX encoder")
        lib.opus_encoder_create.restype = ctypes.c_void_p
        lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int,
                                            ctypes.POINTER(ctypes.c_int)]
        lib.opus_encode.restype = ctypes.c_int32
        lib.opus_encode.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int16),
                                    ctypes.c_int, ctypes.c_char_p, ctypes.c_int32]
        lib.opus_encoder_ctl.restype = ctypes.c_int
        lib.opus_encoder_destroy.restype = None
        lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
        self._lib = lib
        error = ctypes.c_int(0)
        self._state = lib.opus_encoder_create(RATE, 1, OPUS_APPLICATION_VOIP,
                                              ctypes.byref(error))
        if error.value != 0 or not self._state:
            raise RuntimeError(f"opus_encoder_create failed ({error.value})")
        for request, value in ((OPUS_SET_DTX_REQUEST, 1),
                               (OPUS_SET_BITRATE_REQUEST, bitrate_bps)):
            if lib.opus_encoder_ctl(ctypes.c_void_p(self._state), ctypes.c_int(request),
                                    ctypes.c_int(value)) != 0:
                raise RuntimeError(f"opus_encoder_ctl({request}) failed")
        self._out = ctypes.create_string_buffer(1500)
        self._quiet = False
        self.sent = 0
        self.left_out = 0

    def payload(self, pcm: np.ndarray) -> bytes | None:
        """One 20 ms frame (960 int16) encoded: its packet, or None when it is left out."""
        pcm = np.ascontiguousarray(pcm, dtype=np.int16)
        n = self._lib.opus_encode(self._state, pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_int16)),
                                  FRAME, self._out, len(self._out))
        if n < 0:
            raise RuntimeError(f"opus_encode failed ({n})")
        header_only = n <= HEADER_ONLY_BYTES
        if header_only and self._quiet:
            self.left_out += 1
            return None
        self._quiet = header_only
        self.sent += 1
        return self._out.raw[:n]

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        pcm: Any = frame.to_ndarray().reshape(-1)  # type: ignore[attr-defined]
        if pcm.size != FRAME or getattr(frame, "sample_rate", RATE) != RATE:
            raise ValueError(f"expected 20 ms mono frames at {RATE} Hz, got {pcm.size} samples")
        assert frame.pts is not None
        data = self.payload(pcm)
        return ([data] if data is not None else []), int(frame.pts)

    def pack(self, packet: Packet) -> tuple[list[bytes], int]:  # pragma: no cover
        raise NotImplementedError("the bot's microphone hands frames, not packets")

    def __del__(self) -> None:
        state, self._state = getattr(self, "_state", None), None
        if state:
            self._lib.opus_encoder_destroy(state)
