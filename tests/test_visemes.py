"""Visemes: the phoneme table, cues from Piper's alignments and from bare audio, per-frame
weights, and the weights -> mouth shape mapping. Real Piper speech (the bundled voice)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.lipsync.base import VISEMES, LipTrack
from pipeline.lipsync.visemes import (
    BOUNDARIES,
    PHONEME_VISEMES,
    STRESS_MARKS,
    VISEME_SHAPES,
    WORD_BREAKS,
    MouthCue,
    VisemeTrack,
    cues_from_audio,
    cues_from_phonemes,
    frame_rms,
    is_modifier,
    shape_for,
    track_for,
    viseme_for,
    weights_from_cues,
)
from pipeline.tts import PiperTTS, SpeechAudio

FPS = 25
PARAGRAPH = (
    "Hello there! My name is Joe, and I will be your guide today. "
    "The quick brown fox jumps over the lazy dog. Would you like some coffee, or perhaps a "
    "cup of tea? We measured the thickness of the ozone layer with a spectrometer in June. "
    "Wanted: an enthusiastic button-maker who thinks clearly, owns a bicycle, and isn't "
    "bothered by rhythm. Judge Watson measured the azure treasure; the genre was bizarre. "
    "Oh, wow! Buy eight fish for nine euros at the Thursday market, behind the church."
)


@pytest.fixture(scope="module")
def speech() -> list[SpeechAudio]:
    # Piper's noise off: the same speech every run, so the thresholds below are not met by
    # chance (with it, one sentence's share of non-REST frames ran 0.50-0.66 from run to run)
    tts = PiperTTS(noise=False)
    tts.load()
    return list(tts._iter_sentences(PARAGRAPH))


def emitted(speech: list[SpeechAudio]) -> set[str]:
    return {ph for s in speech for ph, _ in s.phonemes}


# ---------------------------------------------------------------------------------------------
# phonemes


def test_piper_gives_alignments_that_cover_the_audio(speech: list[SpeechAudio]) -> None:
    assert len(speech) >= 8
    for s in speech:
        assert s.phonemes, "the bundled voice should give phoneme alignments"
        total = sum(n for _, n in s.phonemes)
        assert abs(total - len(s.pcm)) <= 0.01 * len(s.pcm)


def test_table_covers_every_phoneme_the_voice_emits(speech: list[SpeechAudio]) -> None:
    phones = emitted(speech)
    unknown = {
        p
        for p in phones
        if p not in PHONEME_VISEMES
        and p not in BOUNDARIES
        and p not in STRESS_MARKS
        and not is_modifier(p)
    }
    assert not unknown, f"phonemes without a viseme: {sorted(unknown)}"
    # sounding phonemes get a real mouth; only boundaries and bilabials are REST
    for p in phones - set(BOUNDARIES) - set(STRESS_MARKS) - set(WORD_BREAKS):
        if is_modifier(p):
            continue
        vis, w = viseme_for(p)
        assert vis in VISEMES and 0 < w <= 1
        if vis == "REST":
            assert p in "pbm", p
    # the paragraph exercises every viseme
    assert {viseme_for(p)[0] for p in phones} == set(VISEMES)


def test_boundaries_are_rest_and_unknown_letters_are_not(caplog: pytest.LogCaptureFixture) -> None:
    for p in "^$_.,!?;: ":
        if p != " ":
            assert viseme_for(p) == ("REST", 1.0)
    assert viseme_for("a") == ("AA", 1.0)
    assert viseme_for("f")[0] == "FF" and viseme_for("θ")[0] == "TH"
    assert viseme_for("u")[0] == "OO" and viseme_for("ɔ")[0] == "OH"
    assert viseme_for("i")[0] == "EE" and viseme_for("m")[0] == "REST"
    vis, w = viseme_for("ʢ")  # a letter missing from the table: half-open, not closed
    assert vis != "REST" and w > 0
    assert viseme_for("ã")[0] == "AA"  # precomposed nasal vowel: its base letter


# ---------------------------------------------------------------------------------------------
# cues


def test_cues_from_a_hand_made_alignment() -> None:
    sr = 48_000
    ms = sr // 1000
    phonemes = [
        ("^", 40 * ms),
        ("h", 60 * ms),
        ("ə", 50 * ms),
        ("l", 60 * ms),
        ("ˈ", 30 * ms),  # stress: its time goes to the next phoneme
        ("o", 80 * ms),
        ("ʊ", 60 * ms),
        (" ", 40 * ms),  # word space: half to each side
        ("m", 70 * ms),
        ("i", 50 * ms),
        ("ː", 40 * ms),  # length: lengthens the previous phoneme
        ("!", 90 * ms),
        ("$", 30 * ms),
    ]
    cues = cues_from_phonemes(phonemes, sr)
    assert cues == [
        MouthCue(0, "REST", 1.0),
        MouthCue(40, "AA", 0.4),
        MouthCue(100, "OH", 0.4),
        MouthCue(150, "AA", 0.45),
        MouthCue(210, "OH", 0.9),
        MouthCue(320, "OO", 0.75),
        MouthCue(400, "REST", 1.0),
        MouthCue(490, "EE", 1.0),
        MouthCue(580, "REST", 1.0),
    ]


def _boundaries_ms(phonemes: tuple[tuple[str, int], ...], sr: int) -> set[int]:
    """Times where a cue may start: every sum of the alignment's samples, and the middle of
    each word space."""
    out, pos = set(), 0
    for ph, n in phonemes:
        out.add(round(pos * 1000 / sr))
        if ph in WORD_BREAKS:
            out.add(round((pos + n // 2) * 1000 / sr))
        pos += n
    return out


def test_cue_times_match_the_alignment(speech: list[SpeechAudio]) -> None:
    for s in speech:
        cues = cues_from_phonemes(s.phonemes, s.sample_rate, pcm=s.pcm)
        allowed = _boundaries_ms(s.phonemes, s.sample_rate)
        assert cues[0].t_ms == 0
        assert all(c.t_ms in allowed for c in cues), s.text
        # clean timeline: strictly increasing, no viseme twice in a row, weights in (0, 1]
        assert all(a.t_ms < b.t_ms for a, b in zip(cues, cues[1:], strict=False))
        assert all(a.viseme != b.viseme for a, b in zip(cues, cues[1:], strict=False))
        assert all(0 < c.weight <= 1 and c.viseme in VISEMES for c in cues)
        assert cues[-1].t_ms < len(s.pcm) * 1000 / s.sample_rate
        # every sounding phoneme starts a cue unless it continues the previous cue's viseme
        n_sounding = sum(1 for ph, _ in s.phonemes if not is_modifier(ph) and ph not in BOUNDARIES)
        assert len(cues) >= n_sounding // 3


def test_cues_from_audio_rest_in_silence_and_shapes_in_speech(speech: list[SpeechAudio]) -> None:
    s = speech[1]
    sr = s.sample_rate
    gap = np.zeros(sr, dtype=np.int16)
    pcm = np.concatenate([gap, s.pcm, gap])
    cues = cues_from_audio(pcm, sr)
    assert all(a.t_ms < b.t_ms for a, b in zip(cues, cues[1:], strict=False))
    assert all(a.viseme != b.viseme for a, b in zip(cues, cues[1:], strict=False))
    assert cues[0] == MouthCue(0, "REST", 1.0) and cues[-1].viseme == "REST"
    assert cues[1].t_ms >= 900  # the first second is silent
    assert cues[-1].t_ms <= 1000 + len(s.pcm) * 1000 // sr + 100
    # speech gets visemes: most of the voiced time is not REST
    track = VisemeTrack(cues, n_frames=len(pcm) * FPS // sr, fps=FPS)
    speaking = track.weights[FPS + 5 : FPS + len(s.pcm) * FPS // sr - 5]
    assert (speaking[:, 0] < 0.7).mean() > 0.5
    assert len({c.viseme for c in cues}) >= 4
    assert cues_from_audio(np.zeros(4800, np.int16), sr) == [MouthCue(0, "REST", 1.0)]


# ---------------------------------------------------------------------------------------------
# per-frame weights


def test_track_weights_are_smooth_and_bounded(speech: list[SpeechAudio]) -> None:
    for s in speech:
        track = track_for(s, FPS)
        assert isinstance(track, LipTrack)
        n = -(-len(s.pcm) * FPS // s.sample_rate)
        assert track.n_frames == n and track.weights.shape == (n, len(VISEMES))
        w = track.weights
        assert w.dtype == np.float32 and w.min() >= 0 and w.max() <= 1
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-4)
        # smooth: no weight swings across (nearly) its whole range from one frame to the next,
        # big steps are rare, and the jaw moves by at most 60% of its range per frame
        step = np.abs(np.diff(w, axis=0))
        assert step.max() <= 0.9 and np.percentile(step.max(axis=1), 95) <= 0.6
        assert step.mean() <= 0.08
        o = track.openness()
        assert o.shape == (n,) and o.min() >= 0 and o.max() <= 1
        assert np.abs(np.diff(o)).max() <= 0.6
        # silence at both ends: the mouth at rest
        assert w[0, 0] > 0.6 and w[-1, 0] > 0.9
        np.testing.assert_array_equal(track.at(-5), w[0])
        np.testing.assert_array_equal(track.at(n + 5), w[-1])
        assert track.cues and track.source == "phonemes"


def test_openness_follows_the_speech_envelope(speech: list[SpeechAudio]) -> None:
    opening = np.concatenate([track_for(s, FPS).openness() for s in speech])
    rms = np.concatenate([frame_rms(s.pcm, s.sample_rate, FPS) for s in speech])
    r = float(np.corrcoef(opening, rms)[0, 1])
    assert r >= 0.5, r
    # and without the alignment, from the audio alone
    bare = [SpeechAudio(s.text, s.pcm, s.sample_rate) for s in speech]
    tracks = [track_for(s, FPS) for s in bare]
    assert all(t.source == "audio" for t in tracks)
    r_audio = float(np.corrcoef(np.concatenate([t.openness() for t in tracks]), rms)[0, 1])
    assert r_audio >= 0.5, r_audio


def test_bilabials_close_the_lips_between_vowels() -> None:
    tts = PiperTTS()
    tts.load()
    (s,) = list(tts._iter_sentences("My mom bought a map for baby Bob."))
    track = track_for(s, FPS)
    o = track.openness()
    frame_ms = 1000 / FPS
    closures = 0
    for prev, cue, nxt in zip(track.cues, track.cues[1:], track.cues[2:], strict=False):
        if cue.viseme != "REST" or prev.viseme == "REST" or nxt.viseme == "REST":
            continue
        if nxt.t_ms - cue.t_ms > 150:
            continue  # a pause, not a closure
        j0, j1 = int(cue.t_ms // frame_ms), int(nxt.t_ms // frame_ms) + 1
        # the lips shut (REST: pressed together) and the jaw nearly closed
        assert track.weights[j0 : j1 + 1, 0].max() >= 0.6, (cue, track.weights[j0 : j1 + 1, 0])
        assert o[j0 : j1 + 1].min() <= 0.2, (cue, o[j0 - 3 : j1 + 3])
        closures += 1
    assert closures >= 4


def test_short_cues_are_not_fully_reached_long_ones_are() -> None:
    cues = [
        MouthCue(0, "REST", 1.0),
        MouthCue(100, "AA", 1.0),
        MouthCue(130, "REST", 1.0),
        MouthCue(400, "OO", 1.0),
        MouthCue(800, "REST", 1.0),
    ]
    w = weights_from_cues(cues, n_frames=30, fps=FPS)
    aa, oo = VISEMES.index("AA"), VISEMES.index("OO")
    assert 0.1 < w[:, aa].max() < 0.8  # 30 ms: only part of the way
    assert w[:, oo].max() > 0.95  # 400 ms: reached
    # a long pause stays shut all the way through (no drift towards the other cues)
    cues = [MouthCue(0, "AA", 1.0), MouthCue(200, "REST", 1.0), MouthCue(9800, "EE", 1.0)]
    w = weights_from_cues(cues, n_frames=250, fps=FPS)
    assert (w[10:240, 0] > 0.999).all() and w[:3, aa].min() > 0.9 and w[-1, 2] > 0.9


# ---------------------------------------------------------------------------------------------
# weights -> mouth shape


def test_shape_for_weights() -> None:
    rest = shape_for(np.eye(len(VISEMES))[0])
    assert rest == VISEME_SHAPES["REST"] and rest.press > 0.5 and rest.open == 0
    # only the non-REST weights matter: the remainder is REST
    half_aa = np.zeros(len(VISEMES), np.float32)
    half_aa[VISEMES.index("AA")] = 0.5
    s = shape_for(half_aa)
    assert s.open == pytest.approx(0.5 * VISEME_SHAPES["AA"].open)
    assert s.press == pytest.approx(0.5 * VISEME_SHAPES["REST"].press)
    # blend 0 is the idle face's own mouth
    assert shape_for(half_aa, blend=0.0).is_rest()
    by = {v: shape_for(np.eye(len(VISEMES))[i]) for i, v in enumerate(VISEMES)}
    assert by["AA"].open > by["OH"].open > by["EE"].open > by["OO"].open
    assert by["OO"].width < by["OH"].width < 0 < by["EE"].width
    assert by["FF"].tuck > 0.5 and by["TH"].tongue > 0.5 and by["EE"].teeth > 0.5
    with pytest.raises(ValueError):
        shape_for([0.5, 0.5])
