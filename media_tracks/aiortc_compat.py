"""Every reach into aiortc's and aioice's private parts, in one place, guarded by their pins.

The server relies on four things aiortc and aioice do not offer publicly:

- a sender's encoder slot (``RTCRtpSender.__encoder``), to give a sender our tuned encoder;
- a transceiver's negotiated codec list (``RTCRtpTransceiver._codecs``);
- an audio receiver's jitter buffer (``RTCRtpReceiver.__jitter_buffer``), to hand microphone
  frames on sooner, and its decoder queue (``RTCRtpReceiver.__decoder_queue``), to take the
  microphone's encoded frames to the session's mic thread directly;
- aioice's host-address function, to gather loopback candidates (tests, loopback-only
  namespaces) — applied only when asked (:func:`use_host_candidates`).

Importing this module checks that the installed versions are the pinned ones: a moved pin is a
clear error at start-up (:class:`AiortcVersionError`), not a silent fallback in the middle of a
call. Update the pins here together with ``requirements.txt`` after checking each item above.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, Literal

import aioice.ice
from aiortc import RTCRtpReceiver, RTCRtpSender, RTCRtpTransceiver
from aiortc.codecs.base import Encoder
from aiortc.jitterbuffer import JitterBuffer

from media_tracks.jitter import LowDelayJitterBuffer

logger = logging.getLogger(__name__)

PINNED = {"aiortc": "1.16.0", "aioice": "0.13.0"}

_SENDER_ENCODER = "_RTCRtpSender__encoder"
_RECEIVER_JITTER = "_RTCRtpReceiver__jitter_buffer"
_RECEIVER_MAPPER = "_RTCRtpReceiver__timestamp_mapper"
_RECEIVER_DECODER_QUEUE = "_RTCRtpReceiver__decoder_queue"
_RECEIVER_DECODER_THREAD = "_RTCRtpReceiver__decoder_thread"


class AiortcVersionError(RuntimeError):
    """The installed aiortc/aioice is not the version this module was checked against."""


def check_versions(installed: dict[str, str] | None = None) -> None:
    """Raise :class:`AiortcVersionError` unless every pinned package has its pinned version."""
    found = installed if installed is not None else {p: version(p) for p in PINNED}
    moved = [f"{p} {found.get(p)} (pinned {v})" for p, v in PINNED.items() if found.get(p) != v]
    if moved:
        raise AiortcVersionError(
            "media_tracks/aiortc_compat.py reaches into private parts of aiortc and aioice "
            f"checked against the pinned versions, but found {', '.join(moved)}: install the "
            "pins from requirements.txt, or re-check that module and update its PINNED"
        )


check_versions()

# --- senders and transceivers -------------------------------------------------------------


def negotiated_codec_name(transceiver: RTCRtpTransceiver) -> str | None:
    """The codec the transceiver's sender will send ("VP8", "H264", ...) once the remote
    offer is applied; None before. (aiortc's sender takes the first negotiated codec.)"""
    codecs = getattr(transceiver, "_codecs", None)
    if not codecs:
        return None
    return str(codecs[0].name)


def has_encoder_slot(sender: RTCRtpSender) -> bool:
    return hasattr(sender, _SENDER_ENCODER)


def sender_encoder(sender: RTCRtpSender) -> Encoder | None:
    """The encoder the sender uses now (None before its first frame or after it stopped)."""
    encoder = getattr(sender, _SENDER_ENCODER, None)
    return encoder if isinstance(encoder, Encoder) else None


def set_sender_encoder(sender: RTCRtpSender, encoder: Encoder) -> None:
    """Fill the sender's encoder slot; the sender makes none of its own once it is set."""
    setattr(sender, _SENDER_ENCODER, encoder)


def give_sender_encoder(sender: RTCRtpSender, encoder: Encoder) -> bool:
    """Fill the sender's encoder slot if it has one and it is empty; False (and a warning
    saying why) where aiortc's own encoder will be used instead."""
    if not has_encoder_slot(sender):
        logger.warning("aiortc's sender has no encoder slot to fill; its own encoder is used")
        return False
    if sender_encoder(sender) is not None:
        logger.warning("the sender already has an encoder; it is kept")
        return False
    set_sender_encoder(sender, encoder)
    return True


# --- receivers ------------------------------------------------------------------------------


def receiver_jitter_buffer(receiver: RTCRtpReceiver) -> JitterBuffer | None:
    buffer = getattr(receiver, _RECEIVER_JITTER, None)
    return buffer if isinstance(buffer, JitterBuffer) else None


def receiver_prefetch(receiver: RTCRtpReceiver) -> int | None:
    """How many frames the receiver's jitter buffer waits for behind a frame (None: no buffer)."""
    buffer = receiver_jitter_buffer(receiver)
    return None if buffer is None else int(getattr(buffer, "_prefetch", 0))


def set_receiver_prefetch(receiver: RTCRtpReceiver, frames: int) -> bool:
    """Give the (audio) receiver a jitter buffer that hands a frame on once ``frames`` more
    have arrived behind it (aiortc waits for 4) and never holds a standing delay after a lost
    packet (``media_tracks.jitter``). False, changing nothing, where the receiver has no such
    buffer."""
    old = receiver_jitter_buffer(receiver)
    if old is None:
        logger.warning("aiortc's receiver has no jitter buffer to shorten")
        return False
    buffer = LowDelayJitterBuffer(capacity=old.capacity, prefetch=frames)
    setattr(receiver, _RECEIVER_JITTER, buffer)
    return True


class _EncodedFrameTap(queue.Queue[Any]):
    """Stands in for a receiver's decoder queue: each (codec, encoded frame) that aiortc puts
    there (on the event loop, in order, after its jitter buffer) goes to ``sink`` instead of
    its decoder thread, followed by any frame the jitter buffer lets go with it (after an
    Opus DTX packet: ``LowDelayJitterBuffer.pop_ready``; aiortc hands on one a packet). That
    thread still waits on this queue and gets the ``None`` that ends it when the receiver
    stops."""

    def __init__(self, receiver: RTCRtpReceiver, sink: Callable[[Any, Any], None]) -> None:
        super().__init__()
        self._receiver = receiver
        self._sink = sink

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            super().put(None, block, timeout)
            return
        codec, encoded_frame = item
        self._sink(codec, encoded_frame)
        pop_ready = getattr(receiver_jitter_buffer(self._receiver), "pop_ready", None)
        while pop_ready is not None and (encoded_frame := pop_ready()) is not None:
            self._sink(codec, encoded_frame)


def tap_encoded_frames(receiver: RTCRtpReceiver, sink: Callable[[Any, Any], None]) -> bool:
    """From now on give ``sink(codec, encoded_frame)`` every frame the receiver would decode
    (``codec``: aiortc's ``RTCRtpCodecParameters``; ``encoded_frame.data``: the payload, in
    order, after the jitter buffer), on the event loop; the receiver's track then gets no
    frames until it ends. Only before the receiver starts (at its track event): False, changing
    nothing, after that or where aiortc's receiver has no such queue."""
    if not isinstance(getattr(receiver, _RECEIVER_DECODER_QUEUE, None), queue.Queue):
        logger.warning("aiortc's receiver has no decoder queue to tap")
        return False
    if getattr(receiver, _RECEIVER_DECODER_THREAD, None) is not None:
        return False  # its decoder thread already holds the old queue
    setattr(receiver, _RECEIVER_DECODER_QUEUE, _EncodedFrameTap(receiver, sink))
    return True


def request_opus_dtx(transceiver: RTCRtpTransceiver) -> bool:
    """Ask the peer to send Opus with DTX (``usedtx=1`` in the answer's fmtp, RFC 7587): a
    browser then stops sending while the person is silent, except a comfort-noise update
    every 400 ms. Call it after ``setRemoteDescription(offer)``, before ``createAnswer``;
    True where Opus was negotiated."""
    asked = False
    for codec in getattr(transceiver, "_codecs", []):  # the negotiated codecs, our copies
        if str(codec.mimeType).lower() == "audio/opus":
            codec.parameters["usedtx"] = 1
            asked = True
    return asked


def receiver_rtp_origin(receiver: RTCRtpReceiver | None) -> Any:
    """The first RTP timestamp the receiver mapped (its timestamp mapper's origin), or None."""
    mapper = getattr(receiver, _RECEIVER_MAPPER, None)
    return getattr(mapper, "_origin", None)


# --- ICE host candidates -------------------------------------------------------------------

_original_get_host_addresses = aioice.ice.get_host_addresses


def _loopback_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else []


def use_host_candidates(mode: Literal["all", "loopback"] | str) -> None:
    """Process-wide: gather host candidates on every interface (aioice's default, which leaves
    127.0.0.1 out) or on 127.0.0.1 only, so no packet is addressed anywhere else."""
    if mode == "loopback":
        aioice.ice.get_host_addresses = _loopback_host_addresses
    else:
        aioice.ice.get_host_addresses = _original_get_host_addresses


def host_candidates_mode() -> str:
    return "loopback" if aioice.ice.get_host_addresses is _loopback_host_addresses else "all"
