"""The voice's encoder: mono Opus, one packet per frame of media.audio_frame_ms, RTP
timestamps from the frames' own pts; in a call it replaces aiortc's encoder and the peer
receives and decodes packets of that length."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from aiortc.codecs.opus import OpusDecoder
from aiortc.jitterbuffer import JitterFrame

from config import load_settings
from media_tracks.aiortc_compat import sender_encoder
from media_tracks.audio_encoder import MonoOpusEncoder
from media_tracks.priority import is_audio_encode
from rtc_server.app import create_app
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates
from rtc_server.services import SERVICES
from tests.fakes.peer import wait_until
from tests.fakes.tts import ToneTTS


def tone_frames(n: int, rate: int, frame_ms: int, hz: float = 440.0, start_pts: int = 0):
    size = rate * frame_ms // 1000
    for i in range(n):
        t = (np.arange(size) + i * size) / rate
        pcm = (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = start_pts + i * size
        frame.time_base = Fraction(1, rate)
        yield frame


@pytest.mark.parametrize(("rate", "frame_ms"), [(48000, 20), (48000, 40), (48000, 60),
                                                (16000, 40)])
def test_one_packet_per_frame_at_the_frames_own_time(rate, frame_ms):
    enc = MonoOpusEncoder(sample_rate=rate, frame_ms=frame_ms, bitrate_bps=32_000)
    dec = OpusDecoder()
    decoded = []
    start = 7 * rate  # a call's audio starts where the media clock is, not at 0
    for i, frame in enumerate(tone_frames(30, rate, frame_ms, start_pts=start)):
        payloads, timestamp = enc.encode(frame)
        assert len(payloads) == 1
        # the Opus RTP clock is 48 kHz whatever the input rate
        assert timestamp == (start + i * rate * frame_ms // 1000) * 48000 // rate
        (out,) = dec.decode(JitterFrame(data=payloads[0], timestamp=timestamp))
        assert out.samples == 48 * frame_ms  # a whole frame in one packet
        decoded.append(out.to_ndarray().reshape(-1, 2)[:, 0])
    assert enc.packets == 30
    pcm = np.concatenate(decoded[5:]).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(pcm))
    peak_hz = np.argmax(spectrum) * 48000 / len(pcm)
    assert abs(peak_hz - 440.0) < 5.0  # the tone comes through


def test_a_packet_is_what_encode_would_send():
    """The track's path (``packet`` then the sender's ``pack``) sends the bytes and RTP
    timestamps that handing aiortc the frame (``encode``) would."""
    by_frame = MonoOpusEncoder(sample_rate=48000, frame_ms=20)
    by_packet = MonoOpusEncoder(sample_rate=48000, frame_ms=20)
    start = 3 * 48000
    for frame in tone_frames(12, 48000, 20, start_pts=start):
        payloads, timestamp = by_frame.encode(frame)
        packet = by_packet.packet(frame)
        assert packet.pts == frame.pts and packet.time_base == Fraction(1, 48000)
        assert by_packet.pack(packet) == (payloads, timestamp)
    assert by_packet.packets == by_frame.packets == 12
    empty = av.Packet(0)  # nothing encoded: nothing sent
    empty.pts = start
    assert by_packet.pack(empty) == ([], start)


def test_wrong_frames_and_settings_are_refused():
    with pytest.raises(ValueError, match="44100"):
        MonoOpusEncoder(sample_rate=44100, frame_ms=20)
    with pytest.raises(ValueError, match="30 ms"):
        MonoOpusEncoder(sample_rate=48000, frame_ms=30)
    enc = MonoOpusEncoder(sample_rate=48000, frame_ms=40)
    with pytest.raises(ValueError, match="1920 samples"):
        enc.encode(next(tone_frames(1, 48000, 20)))


def test_the_server_executor_still_runs_it_inline():
    enc = MonoOpusEncoder(sample_rate=48000, frame_ms=20)
    assert is_audio_encode(enc.encode)


@pytest.mark.parametrize("frame_ms", [20, 40])
async def test_a_call_sends_frames_of_the_configured_length(
    loopback_only, aiohttp_client, frame_ms
):
    use_host_candidates("loopback")
    settings = load_settings(env={}, overrides={
        "webrtc.host_candidates": "loopback", "media.audio_frame_ms": frame_ms,
    })
    app = create_app(settings, tts=ToneTTS())
    client = await aiohttp_client(app)
    bot = Bot(str(client.make_url("")).rstrip("/"))
    await bot.connect()
    await wait_until(lambda: len(bot.audio.pts) >= 30, 30)
    (session,) = app[SERVICES].sessions.values()
    audio_sender = next(t.sender for t in session.pc.getTransceivers() if t.kind == "audio")
    encoder = sender_encoder(audio_sender)
    assert isinstance(encoder, MonoOpusEncoder) and encoder is session.audio_encoder
    assert encoder.frame_ms == frame_ms and encoder.bitrate_bps == 32_000
    assert encoder.complexity == 5
    assert session.audio_track.encoder is encoder  # the track hands the sender packets
    steps = np.diff(np.array(bot.audio.pts[-20:]))
    assert set(steps.tolist()) == {48 * frame_ms}  # one frame a packet, no gaps
    await bot.aclose()
