"""A jitter buffer for incoming audio that never keeps a standing delay after a lost packet.

aiortc's ``JitterBuffer`` hands on at most one frame per packet that arrives. When a packet
is lost it waits for it until the buffer is full (16 packets: 320 ms of 20 ms audio), then
skips it, but from then on it still hands on one frame per arrival: the 15 frames it held
stay queued for the rest of the call. One lost packet made the server hear the person
~300 ms late from then on (their end of turn, their barge-in), and the bench's bot hear the
avatar as late (a whole run's client voice-to-voice ~370 ms over the server's).

:class:`LowDelayJitterBuffer` releases a packet once ``prefetch`` newer ones have arrived
(a reordering of up to that many packets is put right) and gives a missing packet up once
``prefetch + 1`` newer ones have: so it, too, hands on at most one frame per arrival, and
holds at most ``prefetch + 1`` packets behind the newest, whatever was lost. Audio only:
each RTP packet is one frame (Opus, G.711); a packet behind the one expected (late, or a
duplicate) is dropped.

A sender in Opus DTX (discontinuous transmission: a browser asked for ``usedtx=1``) stops
sending while the person is silent. The packet it sends as it stops holds only the Opus header
(at most ``DTX_MAX_BYTES``), and nothing comes after it for up to 400 ms. Such a packet, when it
arrives as the newest, lets everything up to it go at once: waiting for ``prefetch`` newer ones
would hold it, and the frames before it, until the person speaks again (a packet missing before
it is given up at once). ``pop_ready`` hands on each frame that may go (the microphone tap asks
after every frame)."""

from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket

DTX_MAX_BYTES = 2  # an Opus packet this short is its header only: no audio follows it
HALF = 1 << 15  # sequence numbers are 16-bit: a difference past half is "behind"


def _delta(a: int, b: int) -> int:
    """``a - b`` in sequence-number space, -HALF..HALF-1."""
    return (a - b + HALF) % (1 << 16) - HALF


class LowDelayJitterBuffer(JitterBuffer):
    """``add`` as aiortc's receiver calls it: (no PLI, the next frame or None). ``lost``:
    packets given up; ``late``: packets dropped because they came after their turn."""

    def __init__(self, capacity: int = 16, prefetch: int = 1) -> None:
        super().__init__(capacity=capacity, prefetch=prefetch)
        self._held: dict[int, RtpPacket] = {}
        self._next: int | None = None  # the sequence number to hand on next
        self._newest: int | None = None
        self._flush: int | None = None  # a DTX packet: everything up to it may go now
        self.lost = 0
        self.late = 0

    @property
    def held(self) -> int:
        return len(self._held)

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        seq = packet.sequence_number
        if self._next is None or self._newest is None:
            self._next = self._newest = seq
        ahead = _delta(seq, self._next)
        if ahead < 0 or seq in self._held:
            self.late += 1
            return False, None
        if ahead >= self.capacity:  # a jump (a long loss, a restarted stream): start there
            self.lost += len(self._held)
            self._held.clear()
            self._next = self._newest = seq
            self._flush = None
        elif _delta(seq, self._newest) > 0:
            self._newest = seq
        self._held[seq] = packet
        if seq == self._newest and len(_payload(packet)) <= DTX_MAX_BYTES:
            self._flush = seq
        return False, self._release()

    def pop_ready(self) -> JitterFrame | None:
        """The next frame that may go now (after ``add`` handed on one), or None."""
        if self._next is None:
            return None
        return self._release()

    def _release(self) -> JitterFrame | None:
        assert self._next is not None and self._newest is not None
        while True:
            behind = _delta(self._newest, self._next)  # packets newer than the next one
            packet = self._held.get(self._next)
            flushing = self._flush is not None and _delta(self._flush, self._next) >= 0
            if self._flush is not None and not flushing:
                self._flush = None
            if packet is not None and (behind >= self._prefetch or flushing):
                del self._held[self._next]
                self._next = (self._next + 1) % (1 << 16)
                return JitterFrame(data=_payload(packet), timestamp=packet.timestamp)
            if packet is None and (behind > self._prefetch or flushing):  # given up: skip it
                self.lost += 1
                self._next = (self._next + 1) % (1 << 16)
                continue
            return None


def _payload(packet: RtpPacket) -> bytes:
    """The depayloaded frame aiortc's receiver put on the packet (its RTP payload before)."""
    data: bytes | None = getattr(packet, "_data", None)
    return packet.payload if data is None else data
