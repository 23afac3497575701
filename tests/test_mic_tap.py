"""The microphone's encoded frames go from aiortc's receiver straight to the mic thread, which
decodes them: the tap passes every frame on in order and still ends aiortc's decoder thread;
the decoder gives back the person's sound (Opus as mono, PCMU with aiortc's decoder)."""

from __future__ import annotations

import threading
from fractions import Fraction

import av
import numpy as np
import pytest
from aiortc import RTCRtpReceiver
from aiortc.codecs import PCMU_CODEC, get_encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from media_tracks.aiortc_compat import tap_encoded_frames
from media_tracks.audio_encoder import MonoOpusEncoder
from rtc_server.mic import MicDecoder, Opus16k, frame_power

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


class _Transport:
    state = "new"


def tone(n: int, hz: float = 440.0, rate: int = 48000, size: int = 960):
    for i in range(n):
        t = (np.arange(size) + i * size) / rate
        pcm = (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = i * size
        frame.time_base = Fraction(1, rate)
        yield frame


def peak_hz(frames: list[av.AudioFrame]) -> float:
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float64)
    return float(np.argmax(np.abs(np.fft.rfft(pcm))) * frames[0].sample_rate / len(pcm))


def test_the_tap_takes_each_frame_in_order_and_still_ends_the_decoder_thread():
    receiver = RTCRtpReceiver("audio", _Transport())
    got = []
    assert tap_encoded_frames(receiver, lambda codec, frame: got.append((codec, frame.data)))
    q = receiver._RTCRtpReceiver__decoder_queue  # what aiortc's receiver puts frames in
    frames = [JitterFrame(data=bytes([i]), timestamp=960 * i) for i in range(5)]
    for f in frames:
        q.put((OPUS, f))
    assert got == [(OPUS, bytes([i])) for i in range(5)]
    # aiortc's decoder thread waits on the queue: the None of the receiver's stop ends it
    ended = threading.Event()
    worker = threading.Thread(target=lambda: (q.get() is None) and ended.set())
    worker.start()
    q.put(None)
    worker.join(5)
    assert ended.is_set() and got[-1] == (OPUS, bytes([4]))


def test_a_started_receiver_is_not_tapped():
    receiver = RTCRtpReceiver("audio", _Transport())
    receiver._RTCRtpReceiver__decoder_thread = threading.current_thread()  # as after receive()
    before = receiver._RTCRtpReceiver__decoder_queue
    assert not tap_encoded_frames(receiver, lambda codec, frame: None)
    assert receiver._RTCRtpReceiver__decoder_queue is before


@pytest.mark.parametrize("libopus", [True, False])
def test_opus_is_decoded_to_mono_and_keeps_the_tone(monkeypatch, libopus):
    """libopus decodes straight to 16 kHz (what the VAD takes: no resampling after it);
    without it FFmpeg's decoder gives 48 kHz, which the resampler then takes down."""
    if not libopus:
        monkeypatch.setattr(Opus16k, "create", classmethod(lambda cls: None))
    rate = 16000 if libopus else 48000
    enc = MonoOpusEncoder(sample_rate=48000, frame_ms=20)
    dec = MicDecoder()
    out = []
    for frame in tone(40):
        payloads, ts = enc.encode(frame)
        out += dec.decode(OPUS, JitterFrame(data=payloads[0], timestamp=ts))
    assert len(out) == 40 and all(f.layout.name == "mono" and f.format.name == "s16" for f in out)
    assert all(f.sample_rate == rate and f.samples == rate // 50 for f in out)
    assert abs(peak_hz(out[5:]) - 440.0) < 5.0
    # a sine of amplitude 8000: power (8000 / 32768)^2 / 2 of full scale
    assert abs(frame_power(out[-1]) - (8000 / 32768) ** 2 / 2) < 0.01
    assert dec.decode(OPUS, JitterFrame(data=b"\xff" * 3, timestamp=0)) == []
    assert dec.errors == 1


def test_libopus_is_the_one_pyav_ships():
    decoder = Opus16k.create()
    assert decoder is not None  # the av wheel has libopus; the server never resamples Opus
    assert "av.libs" in str(decoder._lib._name) and "libopus" in str(decoder._lib._name)


def test_other_codecs_use_aiortcs_decoders():
    enc = get_encoder(PCMU_CODEC)
    dec = MicDecoder()
    out = []
    for frame in tone(20, hz=300.0, rate=8000, size=160):
        payloads, ts = enc.encode(frame)
        out += dec.decode(PCMU_CODEC, JitterFrame(data=payloads[0], timestamp=ts))
    assert len(out) == 20 and abs(peak_hz(out[2:]) - 300.0) < 10.0

