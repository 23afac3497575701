"""Opus DTX on the microphone: the server asks for it in its answer, a sender in DTX (the
bot, as WebRTC sends) leaves the silent frames out, and the mic thread still hears the time
they covered as silence: at wall-clock pace while the sender is quiet, and from the RTP
timestamps where a packet shows a gap. Driven by a fake clock and fake timers: no sleeping."""

from __future__ import annotations

import heapq
from fractions import Fraction
from typing import Any

import av
import numpy as np
import pytest
from aiortc import AudioStreamTrack, RTCPeerConnection, RTCRtpReceiver
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from media_tracks.aiortc_compat import receiver_jitter_buffer, request_opus_dtx
from rtc_server.bot_dtx import DtxOpusEncoder, answer_asks_dtx
from rtc_server.mic import GapFill, MicStats, set_audio_prefetch, tap_microphone

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
MS = 1_000_000


def speech_then_silence(speech: int, silence: int, more_speech: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    frames = []
    for i in range(speech + silence + more_speech):
        loud = i < speech or i >= speech + silence
        pcm = rng.standard_normal(960) * (4000 if loud else 0)
        frames.append(pcm.astype(np.int16))
    return frames


def test_the_dtx_encoder_sends_as_webrtc_does():
    enc = DtxOpusEncoder()
    out = [enc.payload(f) for f in speech_then_silence(10, 90, 5)]
    sent = [i for i, p in enumerate(out) if p is not None]
    header_only = [i for i in sent if len(out[i]) <= 2]
    assert sent[:10] == list(range(10))  # speech: every frame
    assert 100 <= sent[-5] and sent[-5:] == list(range(100, 105))  # and again at once
    # the silence: a header-only packet as the sender goes quiet, then only the ~400 ms
    # comfort-noise updates, each followed by one header-only packet again
    quiet = [i for i in sent if 10 <= i < 100]
    assert header_only and all(len(out[i]) > 2 for i in quiet if i - 1 in header_only)
    assert len(quiet) <= 20 and enc.left_out == 105 - len(sent)
    updates = [i for i in quiet if i not in header_only and i > header_only[0]]
    assert len(updates) >= 3 and all(15 <= g <= 25 for g in np.diff(updates))


def test_gap_fill_follows_wall_clock_while_quiet_and_the_timestamps_after():
    fill = GapFill(48_000)
    for i in range(5):  # 20 ms frames, arriving in real time
        assert fill.frame(960 * i, 60, 20 * MS * i) == 0
    assert not fill.in_dtx
    assert fill.frame(960 * 5, 1, 100 * MS) == 0 and fill.in_dtx  # quiet from here
    given = [fill.due(110 * MS)]  # LAG_NS behind the wall clock, whole frames only
    given += [fill.due(140 * MS), fill.due(141 * MS), fill.due(200 * MS)]
    assert given == [0, 960, 0, 960 * 3]  # 80 ms after the lag: frames 6..9
    # the next packet, 400 ms after the quiet one: the rest of its gap comes before it
    given.append(fill.frame(960 * 25, 40, 500 * MS))
    assert given[-1] == 960 * (25 - 10)
    assert not fill.in_dtx and fill.due(900 * MS) == 0
    assert sum(given) == 960 * 19  # frames 6..24: exactly what the sender left out


def test_quiet_lasts_through_comfort_noise_updates_and_ends_with_sound():
    fill = GapFill(48_000)
    fill.frame(0, 1, 0)
    for k in range(1, 4):  # an update every 400 ms, each followed by a DTX packet
        fill.frame(960 * 20 * k, 40, 400 * MS * k)
        assert not fill.in_dtx and fill.quiet_for_ns(400 * MS * k) == 400 * MS * k
        fill.frame(960 * (20 * k + 1), 1, 400 * MS * k + 20 * MS)
        assert fill.in_dtx
    fill.frame(960 * 61, 80, 1240 * MS)
    fill.frame(960 * 62, 80, 1260 * MS)  # two frames with sound: speech
    assert fill.quiet_for_ns(1260 * MS) == 0


def test_gap_fill_never_goes_back_and_skips_a_restart():
    fill = GapFill(48_000)
    fill.frame(0, 1, 0)
    assert fill.due(1000 * MS) == 960 * 49  # the packet after the quiet one is late ...
    assert fill.frame(960 * 45, 60, 1000 * MS) == 0  # ... and comes after the silence
    assert fill.frame(960 * 46, 60, 1020 * MS) == 0
    assert fill.frame((960 * 46 + 48_000 * 60) % 2**32, 60, 1040 * MS) == 0  # a restart
    fill2 = GapFill(48_000)
    fill2.frame(2**32 - 960, 60, 0)
    assert fill2.frame(960, 60, 40 * MS) == 960  # the timestamps wrap: one frame lost


class _FakeTimers:
    def __init__(self) -> None:
        self.now = 0
        self._queue: list[tuple[int, int, Any]] = []
        self._n = 0

    def call_later(self, delay_s: float, callback: Any) -> None:
        self._n += 1
        heapq.heappush(self._queue, (self.now + int(delay_s * 1e9), self._n, callback))

    def run_until(self, t_ns: int) -> None:
        while self._queue and self._queue[0][0] <= t_ns:
            at, _, callback = heapq.heappop(self._queue)
            self.now = at
            callback()
        self.now = t_ns


class _Transport:
    state = "new"


class _Pc:
    def __init__(self, receiver: RTCRtpReceiver) -> None:
        self._receiver = receiver

    def getReceivers(self) -> list[RTCRtpReceiver]:  # noqa: N802 (aiortc's name)
        return [self._receiver]


def test_the_tap_hears_the_left_out_silence_in_time():
    receiver = RTCRtpReceiver("audio", _Transport())
    track = AudioStreamTrack()
    receiver._track = track
    pc: Any = _Pc(receiver)
    timers = _FakeTimers()
    heard: list[tuple[int, np.ndarray]] = []  # (wall ns when fed, pcm at 16 kHz)

    def feed(work: Any) -> None:
        for frame in work():
            heard.append((timers.now, frame.to_ndarray().reshape(-1)))

    assert set_audio_prefetch(pc, track, 1)
    assert tap_microphone(pc, track, feed=feed, stats=MicStats(), heard=lambda: None,
                          now_ns=lambda: timers.now, call_later=timers.call_later)
    buffer = receiver_jitter_buffer(receiver)
    queue = receiver._RTCRtpReceiver__decoder_queue
    enc = DtxOpusEncoder()
    frames = speech_then_silence(10, 60, 5)
    seq = 0
    for i, pcm in enumerate(frames):
        arrival = (i + 1) * 20 * MS  # a frame is sent once it has been captured
        timers.run_until(arrival)
        data = enc.payload(pcm)
        if data is None:
            continue
        packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=960 * i)
        packet._data = data
        seq += 1
        _, frame = buffer.add(packet)  # as aiortc's receiver does
        if frame is not None:
            queue.put((OPUS, frame))
    timers.run_until(76 * 20 * MS)
    total = sum(pcm.size for _, pcm in heard)
    # every frame but the last (held by the prefetch) is heard: none lost, none doubled
    assert total == 74 * 320
    # while the sender was quiet the silence came in time: never more than 2 frames behind
    fed_by = {}
    acc = 0
    for t, pcm in heard:
        acc += pcm.size
        fed_by[t] = acc
    first_left_out = 21  # 10 frames of speech, 10 sent silent, 1 header-only sent
    for i in range(first_left_out + 2, 70):
        t = (i + 1) * 20 * MS
        got = max((v for k, v in fed_by.items() if k <= t), default=0)
        assert got >= (i - 2) * 320, (i, got)
    assert enc.left_out > 40


def test_the_answer_asks_for_dtx_and_the_bot_reads_it():
    async def answer(dtx: bool) -> str:
        offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
        try:
            offerer.addTransceiver("audio", direction="sendrecv")
            await offerer.setLocalDescription(await offerer.createOffer())
            await answerer.setRemoteDescription(offerer.localDescription)
            if dtx:
                assert request_opus_dtx(answerer.getTransceivers()[0])
            await answerer.setLocalDescription(await answerer.createAnswer())
            await offerer.setRemoteDescription(answerer.localDescription)
            return answerer.localDescription.sdp
        finally:
            await offerer.close()
            await answerer.close()

    import asyncio

    asked, plain = asyncio.run(answer(True)), asyncio.run(answer(False))
    assert "usedtx=1" in asked and answer_asks_dtx(asked)
    assert not answer_asks_dtx(plain)


@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_silence_frames_come_at_the_decoded_rate(rate):
    from rtc_server.mic import MicDecoder

    dec = MicDecoder()
    dec.rate = rate
    (frame,) = dec.silence(960, 48_000)
    assert frame.sample_rate == rate and frame.samples == rate // 50
    assert not frame.to_ndarray().any()
    assert isinstance(frame, av.AudioFrame) and Fraction(frame.samples, rate) == Fraction(1, 50)
