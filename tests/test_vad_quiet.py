"""A quiet microphone skips the VAD model (``vad.skip_quiet``): the same turns are heard, the
model runs only while there is sound."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from config import load_settings
from pipeline.vad import (
    CHUNK_SAMPLES,
    QUIET_AFTER_CHUNKS,
    Listener,
    SileroVad,
    SpeechBlip,
    SpeechOnset,
    SpeechStart,
)
from rtc_server.conversation import make_conversation_parts
from tests.fakes.speech import silence

SR = 16000
CHUNK_MS = CHUNK_SAMPLES * 1000 // SR


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad()


def noise(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    """White noise whose power is ``dbfs`` (float32, -1..1)."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 10 ** (dbfs / 20), round(seconds * SR)).astype(np.float32)


def run(vad: SileroVad, audio: np.ndarray, quiet_dbfs: float | None) -> tuple[list, Listener, int]:
    """Events, the listener, and how many chunks the model scored, for ``audio`` fed in 20 ms
    pieces (one decoded WebRTC frame each)."""
    listener = Listener(vad, pause_ms=96, onset_ms=96, quiet_dbfs=quiet_dbfs)
    scored = 0
    prob = listener.stream.prob

    def counted(chunk: np.ndarray) -> float:
        nonlocal scored
        scored += 1
        return prob(chunk)

    listener.stream.prob = counted  # type: ignore[method-assign]
    events = []
    for i in range(0, len(audio), 320):
        events += listener.feed(audio[i : i + 320])
    return events, listener, scored


def quiet_speech(text: str) -> np.ndarray:
    """``text`` spoken by the bundled voice without Piper's random noise: the same samples in
    every process, so the onsets compared below do not move from run to run."""
    from piper import SynthesisConfig

    from tests.fakes.speech import _tts

    cfg = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    pcm = [p.pcm for p in _tts(SR)._streamed(text, cfg, whole=True)]
    return np.concatenate(pcm).astype(np.float32) / 32768.0


def conversation_audio(floor_dbfs: float | None) -> np.ndarray:
    """Two questions after and between quiet stretches of 2 s: digital silence, or a noise
    floor at ``floor_dbfs``."""
    parts = [silence(2.0), quiet_speech("Hello, can you hear me?"), silence(2.0),
             quiet_speech("What is the weather like tomorrow in Paris?"), silence(1.5)]
    audio = np.concatenate(parts)
    if floor_dbfs is not None:
        audio = audio + noise(len(audio) / SR, floor_dbfs)
    return audio


@pytest.mark.parametrize("floor_dbfs", [None, -80.0])
def test_quiet_stretches_skip_the_model_and_the_same_turns_are_heard(
    vad: SileroVad, floor_dbfs: float | None
) -> None:
    audio = conversation_audio(floor_dbfs)
    always, _, all_chunks = run(vad, audio, None)
    skipping, listener, scored = run(vad, audio, -70.0)

    assert all_chunks == len(audio) // CHUNK_SAMPLES
    # most of the quiet went without the model
    assert listener.skipped_chunks == all_chunks - scored
    assert listener.skipped_chunks > 0.4 * all_chunks
    # the same events, in the same order; each speech end, pause and utterance at the same
    # chunk; a start (and a likely one) at the same chunk or at most one sooner
    assert [type(e) for e in skipping] == [type(e) for e in always]
    assert sum(isinstance(e, SpeechStart) for e in always) == 2
    for a, b in zip(always, skipping, strict=True):
        starting = {"onset_ms", "confirmed_ms"} | (
            {"at_ms"} if isinstance(a, SpeechOnset | SpeechBlip) else set())
        for name in (f.name for f in dataclasses.fields(a) if f.name != "audio"):
            value, got = getattr(a, name), getattr(b, name)
            if name in starting:
                assert value - CHUNK_MS <= got <= value, (type(a).__name__, name, value, got)
            else:
                assert got == value, (type(a).__name__, name, value, got)


def test_sound_over_the_floor_is_always_scored(vad: SileroVad) -> None:
    _, listener, scored = run(vad, noise(3.0, -55.0), -70.0)
    assert listener.skipped_chunks == 0
    assert scored == 3 * SR // CHUNK_SAMPLES


def test_only_a_run_of_quiet_chunks_is_skipped(vad: SileroVad) -> None:
    loud = noise(CHUNK_MS / 1000, -40.0)
    quiet = np.zeros(CHUNK_SAMPLES, np.float32)
    listener = Listener(vad, quiet_dbfs=-70.0)
    # QUIET_AFTER_CHUNKS quiet chunks, then a loud one: every chunk scored
    listener.feed(np.concatenate([quiet] * QUIET_AFTER_CHUNKS + [loud]))
    assert listener.skipped_chunks == 0
    # a longer run: the chunks past QUIET_AFTER_CHUNKS are skipped, until a loud one
    listener.feed(np.concatenate([quiet] * (QUIET_AFTER_CHUNKS + 3) + [loud] + [quiet] * 2))
    assert listener.skipped_chunks == 3
    listener.reset()
    listener.feed(np.concatenate([quiet] * (QUIET_AFTER_CHUNKS + 1)))
    assert listener.skipped_chunks == 4


def test_the_setting_turns_it_off(vad: SileroVad) -> None:
    for skip, expect_skips in ((True, True), (False, False)):
        settings = load_settings(env={}, overrides={"vad.skip_quiet": skip})
        listener, _ = make_conversation_parts(settings, vad)
        assert listener is not None
        listener.feed(silence(1.0))
        assert (listener.skipped_chunks > 0) is expect_skips
