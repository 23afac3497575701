"""The audio jitter buffer keeps no standing delay: after a lost packet (or a burst of them)
it hands on one frame per arrival again at once, where aiortc's buffer stays ~15 frames
behind for the rest of the call; reordering within ``prefetch`` is put right."""

from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from media_tracks.jitter import LowDelayJitterBuffer


def packet(seq: int) -> RtpPacket:
    p = RtpPacket(payload_type=111, sequence_number=seq % 65536, timestamp=(seq * 960) % 2**32)
    p._data = seq.to_bytes(4, "big")  # what aiortc's receiver sets: the depayloaded frame
    return p


def run(buffer: JitterBuffer, seqs: list[int]) -> list[tuple[int, int | None]]:
    """(arriving sequence number, the frame handed on then: its sequence number or None)."""
    out = []
    for s in seqs:
        _, frame = buffer.add(packet(s))
        out.append((s, None if frame is None else int.from_bytes(frame.data, "big")))
    return out


def lag_at_end(out: list[tuple[int, int | None]]) -> int:
    arrived, handed = out[-1]
    assert handed is not None
    return arrived - handed


def test_one_lost_packet_leaves_no_standing_delay():
    seqs = [s for s in range(60) if s != 5]
    ours = run(LowDelayJitterBuffer(16, prefetch=1), seqs)
    assert lag_at_end(ours) == 1  # the prefetch, as before the loss
    assert [h for _, h in ours if h is not None] == [s for s in range(59) if s != 5]
    # aiortc's own buffer, with the same prefetch, is 14 packets (280 ms) behind from then on
    assert lag_at_end(run(JitterBuffer(16, prefetch=1), seqs)) == 14


def test_a_burst_of_losses_and_the_buffer_counts_them():
    buffer = LowDelayJitterBuffer(16, prefetch=1)
    seqs = [s for s in range(80) if not 10 <= s < 22]
    out = run(buffer, seqs)
    assert lag_at_end(out) == 1 and buffer.lost == 12
    assert [h for _, h in out if h is not None] == [*range(10), *range(22, 79)]


def test_reordering_within_prefetch_is_put_right():
    seqs = [0, 1, 3, 2, 4, 6, 5, 7, 8]
    out = run(LowDelayJitterBuffer(16, prefetch=1), seqs)
    assert [h for _, h in out if h is not None] == [0, 1, 2, 3, 4, 5, 6, 7]


def test_late_and_duplicate_packets_are_dropped():
    buffer = LowDelayJitterBuffer(16, prefetch=1)
    out = run(buffer, [0, 1, 2, 4, 5, 3, 5, 6])  # 3 given up at 5's arrival, then comes late
    assert [h for _, h in out if h is not None] == [0, 1, 2, 4, 5]
    assert buffer.lost == 1 and buffer.late == 2


def test_without_prefetch_each_packet_goes_on_at_once():
    out = run(LowDelayJitterBuffer(16, prefetch=0), [0, 1, 3, 4])
    assert out == [(0, 0), (1, 1), (3, 3), (4, 4)]


def test_sequence_numbers_wrap_and_a_jump_restarts():
    buffer = LowDelayJitterBuffer(16, prefetch=1)
    out = run(buffer, [65533, 65534, 65535, 65536, 65537, 70000, 70001])
    assert [h for _, h in out if h is not None] == [65533, 65534, 65535, 65536, 70000]
    assert buffer.held == 1


def dtx(seq: int) -> RtpPacket:
    """The header-only packet an Opus sender in DTX sends as it goes quiet."""
    p = packet(seq)
    p._data = b"\x08"
    return p


def test_a_dtx_packet_lets_everything_up_to_it_go_at_once():
    buffer = LowDelayJitterBuffer(16, prefetch=1)
    handed = [f.data for f in (buffer.add(packet(s))[1] for s in range(3)) if f is not None]
    assert handed == [(0).to_bytes(4, "big"), (1).to_bytes(4, "big")]
    _, frame = buffer.add(dtx(3))  # nothing comes after it for a while
    assert frame is not None and frame.data == (2).to_bytes(4, "big")
    last = buffer.pop_ready()
    assert last is not None and last.data == b"\x08" and last.timestamp == 3 * 960
    assert buffer.pop_ready() is None and buffer.held == 0
    # the sender speaks again: the prefetch holds as before
    assert buffer.add(packet(4))[1] is None
    assert buffer.add(packet(5))[1].data == (4).to_bytes(4, "big")
    assert buffer.pop_ready() is None


def test_without_a_dtx_packet_nothing_more_is_ready():
    buffer = LowDelayJitterBuffer(16, prefetch=2)
    for s in range(4):
        buffer.add(packet(s))
    assert buffer.pop_ready() is None and buffer.held == 2


def test_a_dtx_packet_that_arrives_late_flushes_nothing():
    buffer = LowDelayJitterBuffer(16, prefetch=1)
    buffer.add(packet(0))
    buffer.add(packet(2))  # 1 is late
    _, frame = buffer.add(dtx(1))  # reordered: not the newest, so 2 still waits
    assert frame is not None and frame.data == b"\x08"
    assert buffer.pop_ready() is None and buffer.held == 1


def test_a_packet_missing_before_a_dtx_packet_is_given_up_at_once():
    buffer = LowDelayJitterBuffer(16, prefetch=1)
    out = [buffer.add(packet(s))[1] for s in (0, 1)]
    _, frame = buffer.add(dtx(3))  # 2 was lost; the sender went quiet after it
    assert frame is not None and frame.data == (1).to_bytes(4, "big")
    last = buffer.pop_ready()
    assert last is not None and last.data == b"\x08" and buffer.lost == 1
    assert out[0] is None and buffer.held == 0
