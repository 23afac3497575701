"""Listening: Silero VAD probabilities, endpointing on Piper speech, 48 kHz -> 16 kHz input."""

from __future__ import annotations

import av
import numpy as np
import pytest

from pipeline.vad import (
    CHUNK_SAMPLES,
    Endpointer,
    Listener,
    Resampler16k,
    SileroVad,
    SpeechEnd,
    SpeechStart,
    to_16k_mono,
)
from tests.fakes.speech import piper_speech, silence, speech_bounds, with_silence

SR = 16000
SENTENCE = "Hello, what is the weather like today?"


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad()


@pytest.fixture(scope="module")
def sentence() -> np.ndarray:
    return piper_speech(SENTENCE)


def probs(vad: SileroVad, audio: np.ndarray) -> np.ndarray:
    stream = vad.new_stream()
    n = len(audio) // CHUNK_SAMPLES
    return np.array([stream.prob(audio[i * 512 : (i + 1) * 512]) for i in range(n)])


def listen(vad: SileroVad, audio: np.ndarray, piece: int = 320, **kwargs) -> list:
    """Feed ``audio`` in ``piece``-sample pieces (20 ms: what a 48 kHz WebRTC frame becomes)."""
    listener = Listener(vad, **kwargs)
    events = []
    for i in range(0, len(audio), piece):
        events += listener.feed(audio[i : i + piece])
    return events


def test_silence_and_tone_are_not_speech(vad: SileroVad) -> None:
    t = np.arange(2 * SR) / SR
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    assert probs(vad, silence(2.0)).max() < 0.1
    assert probs(vad, tone).max() < 0.2


def test_speech_is_speech(vad: SileroVad, sentence: np.ndarray) -> None:
    onset_s, end_s = speech_bounds(sentence)
    p = probs(vad, with_silence(sentence, 0.5, 0.5))
    inside = p[int((0.5 + onset_s) * SR) // 512 + 2 : int((0.5 + end_s) * SR) // 512 - 1]
    assert p.max() > 0.9
    assert (inside > 0.5).mean() > 0.7


def test_stream_state_is_per_stream(vad: SileroVad, sentence: np.ndarray) -> None:
    a, b = vad.new_stream(), vad.new_stream()
    chunk = sentence[8000:8512]
    for _ in range(5):
        a.prob(chunk)
    b.prob(silence(0.032))
    fresh = vad.new_stream()
    assert b.prob(chunk) != a.prob(chunk)
    b.reset()
    assert b.prob(chunk) == fresh.prob(chunk)
    with pytest.raises(ValueError):
        a.prob(np.zeros(480, np.float32))


def test_one_sentence_one_utterance(vad: SileroVad, sentence: np.ndarray) -> None:
    audio = with_silence(sentence, 1.0, 1.0)
    onset_s, end_s = speech_bounds(sentence)
    onset_ms, end_ms = 1000 + onset_s * 1000, 1000 + end_s * 1000

    events = listen(vad, audio)

    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    start, end = events
    assert isinstance(start, SpeechStart) and isinstance(end, SpeechEnd)
    assert abs(start.onset_ms - onset_ms) <= 100
    assert start.confirmed_ms - start.onset_ms >= 250
    assert end.onset_ms == start.onset_ms
    assert abs(end.end_ms - end_ms) <= 150
    assert 500 <= end.detected_ms - end_ms <= 800
    assert end.detected_ms - end.end_ms == 608  # 600 ms of silence, in whole 32 ms chunks
    # the utterance: 300 ms of pre-roll before the onset, up to the detection, sample-exact
    first = (start.onset_ms - 300) * SR // 1000
    assert len(end.audio) == (end.detected_ms - start.onset_ms + 300) * SR // 1000
    np.testing.assert_array_equal(end.audio, audio[first : first + len(end.audio)])


def test_short_burst_gives_no_events(vad: SileroVad, sentence: np.ndarray) -> None:
    n = 150 * SR // 1000
    onset_s, end_s = speech_bounds(sentence)
    cuts = [sentence[i : i + n] for i in range(int(onset_s * SR), int(end_s * SR) - n, 800)]
    peaks = [probs(vad, with_silence(cut, 0.5, 0.5)).max() for cut in cuts]
    burst = cuts[int(np.argmax(peaks))]  # the 150 ms the VAD is surest of
    assert max(peaks) > 0.8  # heard as speech, but too short for an utterance
    assert listen(vad, with_silence(burst, 1.0, 1.0)) == []


@pytest.mark.parametrize(("gap_s", "utterances"), [(0.3, 1), (1.0, 2)])
def test_pause_splits_utterances(vad: SileroVad, gap_s: float, utterances: int) -> None:
    first, second = piper_speech("Good morning."), piper_speech("How are you doing today?")
    audio = np.concatenate([silence(1.0), first, silence(gap_s), second, silence(1.0)])
    events = listen(vad, audio)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd] * utterances


def test_max_utterance_cuts(vad: SileroVad, sentence: np.ndarray) -> None:
    events = listen(vad, with_silence(sentence, 1.0, 1.0), max_utterance_s=1.0)
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert isinstance(events[0], SpeechStart)
    assert len(ends) >= 1
    cut = ends[0]
    assert cut.end_ms == cut.detected_ms
    assert 1000 <= cut.detected_ms - cut.onset_ms < 1032
    assert len(cut.audio) == (cut.detected_ms - cut.onset_ms + 300) * SR // 1000


def test_endpointer_hysteresis_on_probabilities() -> None:
    ep = Endpointer(min_speech_ms=250, end_silence_ms=600, pre_roll_ms=64)

    def run(seq: list[float]) -> list:
        return [e for p in seq for e in ep.feed(p)]

    assert run([0.0] * 5 + [0.9] * 7 + [0.1] * 30) == []  # 224 ms: a blip
    # 0.4 sits between the thresholds: it keeps speech going and never starts it
    assert run([0.4] * 40) == []
    events = run([0.9] * 2 + [0.4] * 6 + [0.2] * 18 + [0.9] + [0.0] * 19)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    start, end = events
    t0 = 42 * 32 + 40 * 32
    assert (start.onset_ms, start.confirmed_ms) == (t0, t0 + 256)
    assert isinstance(end, SpeechEnd)
    # speech ends after the 0.4s (hysteresis), the 0.2 run (576 ms) is not enough, the 0.9
    # chunk restarts the silence count: end after the last 0.9 plus 608 ms
    assert end.end_ms == t0 + 27 * 32
    assert end.detected_ms == end.end_ms + 608
    assert len(end.audio) == (end.detected_ms - t0 + 64) * SR // 1000
    assert not ep.in_speech and ep.time_ms == end.detected_ms


def frames_48k(pcm: np.ndarray, channels: int, samples: int = 960) -> list[av.AudioFrame]:
    """int16 [n, channels] -> frames as aiortc delivers them: s16 packed, 20 ms, pts in samples."""
    layout = "stereo" if channels == 2 else "mono"
    out = []
    for i in range(0, len(pcm) - samples + 1, samples):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm[i : i + samples]).reshape(1, -1), format="s16", layout=layout
        )
        frame.sample_rate = 48000
        frame.pts = i
        out.append(frame)
    return out


def test_48k_stereo_frames_to_16k_mono(sentence: np.ndarray) -> None:
    speech = piper_speech(SENTENCE, 48000)
    n = len(speech) // 960 * 960
    left = (speech[:n] * 20000).astype(np.int16)
    right = (left // 2).astype(np.int16)
    stereo = np.stack([left, right], axis=1)

    resampler = Resampler16k()
    pieces = [resampler.push(f) for f in frames_48k(stereo, 2)]
    streamed = np.concatenate([*pieces, resampler.flush()])

    assert len(streamed) == n // 3
    assert all(abs(len(p) - 320) <= 16 for p in pieces)
    whole = to_16k_mono(stereo.reshape(-1), 48000, 2)
    assert len(whole) == n // 3
    np.testing.assert_allclose(streamed, whole, atol=1e-5)  # no edges at frame boundaries
    expected = (left.astype(np.float32) + right) / 2 / 32768  # channels averaged
    assert np.corrcoef(streamed[10:-10], expected[::3][10 : len(streamed) - 10])[0, 1] > 0.99
    assert abs(np.abs(streamed).max() - np.abs(expected).max()) < 0.05


def test_48k_mono_frames(vad: SileroVad) -> None:
    t = np.arange(48000) / 48000
    tone = (np.sin(2 * np.pi * 300 * t) * 16000).astype(np.int16).reshape(-1, 1)
    resampler = Resampler16k()
    out = np.concatenate([*(resampler.push(f) for f in frames_48k(tone, 1)), resampler.flush()])
    assert len(out) == 16000
    ref = np.sin(2 * np.pi * 300 * np.arange(16000) / 16000) * 16000 / 32768
    assert np.abs(out[100:-100] - ref[100:-100]).max() < 0.01
    listener = Listener(vad)
    assert listener.feed(out) == [] and listener.time_ms == 16000 // 512 * 32


def test_pause_events_come_before_the_end_and_only_once_per_silence():
    from pipeline.vad import Endpointer, SpeechEnd, SpeechPause, SpeechResume, SpeechStart

    ep = Endpointer(min_speech_ms=96, end_silence_ms=608, pause_ms=256)
    events = []
    # 0.5 s speech, 0.384 s pause (a pause event, no end), 0.5 s speech, then silence
    for prob in [0.9] * 16 + [0.0] * 12 + [0.9] * 16 + [0.0] * 30:
        events += [(ep.time_ms, e) for e in ep.feed(prob)]
    kinds = [type(e).__name__ for _, e in events]
    assert kinds == ["SpeechStart", "SpeechPause", "SpeechResume", "SpeechPause", "SpeechEnd"]
    resume = events.pop(2)
    # the resume comes with the first speech chunk after the pause, and only once
    assert isinstance(resume[1], SpeechResume) and resume[0] == resume[1].at_ms
    assert resume[1].at_ms == (16 + 12 + 1) * 32
    first_pause, second_pause, end = events[1][1], events[2][1], events[3][1]
    assert isinstance(events[0][1], SpeechStart)
    assert isinstance(first_pause, SpeechPause) and isinstance(second_pause, SpeechPause)
    assert isinstance(end, SpeechEnd)
    # the first pause was not the end (speech resumed); the second one was: same end_ms
    assert first_pause.end_ms < second_pause.end_ms == end.end_ms
    assert events[2][0] < events[3][0]  # ... and it came 352 ms earlier
    assert events[3][0] - events[2][0] == 608 - 256
    assert len(second_pause.audio) <= len(end.audio)


def test_no_pause_events_unless_asked():
    from pipeline.vad import Endpointer

    ep = Endpointer(min_speech_ms=96, end_silence_ms=608)
    kinds = [type(e).__name__ for p in [0.9] * 16 + [0.0] * 30 for e in ep.feed(p)]
    assert kinds == ["SpeechStart", "SpeechEnd"]


def test_a_likely_start_is_told_early_and_taken_back_when_it_stops():
    from pipeline.vad import Endpointer, SpeechBlip, SpeechOnset

    ep = Endpointer(min_speech_ms=256, end_silence_ms=608, onset_ms=96)
    told = []
    # 128 ms of sound (a cough), silence, then 0.5 s of speech
    for prob in [0.9] * 4 + [0.0] * 10 + [0.9] * 16 + [0.0] * 25:
        told += [(ep.time_ms, e) for e in ep.feed(prob)]
    assert [type(e).__name__ for _, e in told] == [
        "SpeechOnset", "SpeechBlip", "SpeechOnset", "SpeechStart", "SpeechEnd"]
    (t1, onset1), (t2, blip), (t3, onset2), (t4, start), _ = told
    assert isinstance(onset1, SpeechOnset) and (onset1.onset_ms, onset1.at_ms) == (0, 96)
    assert t1 == 96  # told at its third chunk, not at the eighth
    assert isinstance(blip, SpeechBlip) and blip.onset_ms == 0 and t2 == blip.at_ms == 160
    assert onset2.onset_ms == start.onset_ms == 14 * 32  # the same run, told twice
    assert t3 == 14 * 32 + 96 and t4 == 14 * 32 + 256


def test_no_likely_start_unless_asked_or_when_it_would_not_be_sooner():
    from pipeline.vad import Endpointer

    for kwargs in ({}, {"onset_ms": 0}, {"onset_ms": 256}, {"onset_ms": 400}):
        ep = Endpointer(min_speech_ms=256, end_silence_ms=608, **kwargs)
        kinds = [type(e).__name__ for p in [0.9] * 4 + [0.0] * 3 + [0.9] * 16 + [0.0] * 30
                 for e in ep.feed(p)]
        assert kinds == ["SpeechStart", "SpeechEnd"], kwargs
