"""Visemes: phonemes (or bare audio) -> timed mouth cues -> smooth per-frame viseme weights.

A speech segment becomes a list of ``MouthCue`` (the animation timeline: from ``t_ms`` on, the
mouth aims at ``viseme`` with strength ``weight``), then a ``VisemeTrack`` holding one row of
``VISEMES`` weights per video frame (each row sums to 1, REST included), ready for the renderer
(``shape_for``) and for the compositor (``LipTrack``).

Cues come from Piper's phoneme alignments (espeak-ng IPA, one code point per entry, each entry
``(phoneme, n_samples)``) when the voice gives them, else from the audio alone
(``cues_from_audio``: loudness-gated spectral shape).
"""

from __future__ import annotations

import logging
import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from face import MouthShape
from pipeline.lipsync.base import VISEMES
from pipeline.tts import SpeechAudio

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
VISEME_INDEX = {v: i for i, v in enumerate(VISEMES)}
REST = "REST"

# ---------------------------------------------------------------------------------------------
# Phonemes -> visemes
# ---------------------------------------------------------------------------------------------

# (viseme, weight): the mouth shape a phoneme aims at and how strongly. Weights below 1 leave
# the rest to REST, and (through ``_dominance``) let neighbouring vowels colour the consonant:
# t, d, n, k, g, h are made with the tongue and barely shape the lips (co-articulation).
PHONEME_VISEMES: dict[str, tuple[str, float]] = {
    # open vowels: jaw well down
    "a": ("AA", 1.0),  # first half of aɪ, aʊ ("my", "now")
    "ɑ": ("AA", 1.0),  # "father", "dog" (en-US)
    "æ": ("AA", 0.9),  # "cat"
    "ʌ": ("AA", 0.75),  # "cup"
    "ɐ": ("AA", 0.55),  # reduced "a"
    "ɒ": ("AA", 0.85),  # "lot" (en-GB)
    "ɶ": ("AA", 0.9),
    "ɞ": ("AA", 0.7),
    # front vowels and glides: lips spread, teeth showing
    "i": ("EE", 1.0),  # "see"
    "ɪ": ("EE", 0.75),  # "sit"; also the second half of aɪ, eɪ, ɔɪ
    "e": ("EE", 0.85),  # first half of eɪ ("day")
    "ɛ": ("EE", 0.85),  # "bed"
    "ᵻ": ("EE", 0.5),  # reduced i ("wanted")
    "ɨ": ("EE", 0.5),
    "ɘ": ("EE", 0.5),
    "ɯ": ("EE", 0.5),
    "ɤ": ("EE", 0.55),
    "j": ("EE", 0.6),  # "yes"
    "ʝ": ("EE", 0.5),
    "ç": ("EE", 0.45),
    # alveolar and palatal consonants: teeth close together, lips a little spread
    "s": ("EE", 0.5),
    "z": ("EE", 0.5),
    "t": ("EE", 0.35),
    "d": ("EE", 0.35),
    "n": ("EE", 0.35),
    "l": ("AA", 0.45),  # jaw half open, the tongue tip up behind the teeth
    "ɾ": ("EE", 0.35),  # flap ("butter")
    "ɫ": ("EE", 0.4),
    "ɬ": ("EE", 0.45),
    "ɮ": ("EE", 0.45),
    "c": ("EE", 0.35),
    "ɟ": ("EE", 0.35),
    "ɲ": ("EE", 0.35),
    "ʎ": ("EE", 0.4),
    "ʈ": ("EE", 0.35),
    "ɖ": ("EE", 0.35),
    "ɳ": ("EE", 0.35),
    "ɭ": ("EE", 0.4),
    "ɕ": ("EE", 0.5),
    "ʑ": ("EE", 0.5),
    "ʂ": ("EE", 0.5),
    "ʐ": ("EE", 0.5),
    "ʔ": ("EE", 0.25),  # glottal stop ("button"): the mouth holds, nearly closed
    # velar, uvular and glottal consonants: the jaw a little open, lips neutral
    "k": ("AA", 0.3),
    "ɡ": ("AA", 0.3),
    "g": ("AA", 0.3),
    "ŋ": ("AA", 0.25),
    "x": ("AA", 0.3),
    "ɣ": ("AA", 0.3),
    "q": ("AA", 0.3),
    "ɢ": ("AA", 0.3),
    "ɴ": ("AA", 0.25),
    "χ": ("AA", 0.3),
    "ʁ": ("AA", 0.3),
    "ʀ": ("AA", 0.3),
    "ħ": ("AA", 0.35),
    "ʕ": ("AA", 0.35),
    "h": ("AA", 0.4),  # takes the next vowel's shape; a half-open breath
    "ɦ": ("AA", 0.4),
    # rounded mid vowels and r: lips rounded, jaw half open
    "o": ("OH", 0.9),  # first half of oʊ ("go")
    "ɔ": ("OH", 1.0),  # "thought", first half of ɔɪ
    "ɜ": ("OH", 0.6),  # "bird" (with r-colour)
    "ɝ": ("OH", 0.6),
    "ɚ": ("OH", 0.55),  # "butter"
    "ə": ("OH", 0.4),  # schwa: neutral, half open
    "ɵ": ("OH", 0.7),
    "ø": ("OH", 0.8),
    "œ": ("OH", 0.85),
    "ɹ": ("OH", 0.5),  # English r is made with rounded lips
    "r": ("OH", 0.5),
    "ɻ": ("OH", 0.5),
    "ɽ": ("OH", 0.45),
    # close rounded vowels, w, and the protruded sh-sounds: small round opening
    "u": ("OO", 1.0),  # "food"
    "ʊ": ("OO", 0.75),  # "book"; second half of aʊ, oʊ
    "ʉ": ("OO", 0.85),
    "y": ("OO", 0.85),
    "ʏ": ("OO", 0.75),
    "w": ("OO", 0.9),
    "ʍ": ("OO", 0.9),
    "ɥ": ("OO", 0.85),
    "ɰ": ("OO", 0.5),
    "ʃ": ("OO", 0.45),  # "she": lips pushed forward, teeth nearly together
    "ʒ": ("OO", 0.45),  # "measure"
    # labiodental: the lower lip to the upper teeth
    "f": ("FF", 1.0),
    "v": ("FF", 0.9),
    "ʋ": ("FF", 0.7),
    "ɱ": ("FF", 0.6),
    "ɸ": ("FF", 0.6),
    "β": ("FF", 0.6),
    "ⱱ": ("FF", 0.6),
    # dental: tongue tip between the teeth
    "θ": ("TH", 1.0),
    "ð": ("TH", 0.85),
    # bilabial: lips together (REST is the closed mouth)
    "p": (REST, 1.0),
    "b": (REST, 1.0),
    "m": (REST, 1.0),
    "ʙ": (REST, 1.0),
    "ɓ": (REST, 1.0),
}

# Entries that are no sound of their own and shape no mouth: they lend their duration to a
# neighbour. Stress marks precede the stressed vowel (espeak writes "nˈeɪm"), so their time
# goes to the next phoneme; length marks and secondary articulations to the previous one.
STRESS_MARKS = frozenset("ˈˌ")
ATTACHED_MARKS = frozenset("ːˑʲʰʷˠˤ˞")
# Word spaces: Piper gives them a duration that is mostly the transition between the words;
# half goes to each side.
WORD_BREAKS = frozenset(" ")
# Utterance boundaries (Piper's BOS ^, EOS $, pad _) and punctuation: pauses, the mouth closed.
BOUNDARIES = frozenset("^$_.,!?;:…—–-\"'()[]{}|‖«»¡¿\n\t")

_warned: set[str] = set()


def is_modifier(phoneme: str) -> bool:
    """True for entries that only modify a neighbour (stress, length, diacritics, spaces)."""
    if phoneme in STRESS_MARKS or phoneme in ATTACHED_MARKS or phoneme in WORD_BREAKS:
        return True
    return bool(phoneme) and all(unicodedata.combining(ch) for ch in phoneme)


def viseme_for(phoneme: str) -> tuple[str, float]:
    """The (viseme, weight) a phoneme aims at. Boundaries and punctuation are (REST, 1.0).

    A phoneme missing from ``PHONEME_VISEMES`` is never silently closed: a letter falls back
    to a half-open neutral mouth (and is logged once), anything else is a pause."""
    hit = PHONEME_VISEMES.get(phoneme)
    if hit is not None:
        return hit
    if phoneme in BOUNDARIES or not phoneme.strip():
        return REST, 1.0
    base = unicodedata.normalize("NFD", phoneme)[:1]  # e.g. a precomposed nasal vowel
    hit = PHONEME_VISEMES.get(base)
    if hit is not None:
        return hit
    if unicodedata.category(phoneme[0]).startswith("L"):
        if phoneme not in _warned:
            _warned.add(phoneme)
            logger.info("phoneme %r has no viseme; using a half-open mouth", phoneme)
        return "AA", 0.3
    return REST, 1.0


# ---------------------------------------------------------------------------------------------
# Cues
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MouthCue:
    """From ``t_ms`` (ms since the start of the segment) until the next cue, the mouth aims at
    ``viseme`` with strength ``weight`` (0..1; the remainder is REST)."""

    t_ms: int
    viseme: str
    weight: float


def _merge(spans: Iterable[tuple[int, str, float]]) -> list[MouthCue]:
    """Cues from (start_sample_ms, viseme, weight) spans in time order: a run of one viseme
    becomes one cue (at its strongest weight); zero-length spans vanish."""
    out: list[MouthCue] = []
    for t_ms, vis, w in spans:
        w = round(float(w), 3)
        if out and out[-1].t_ms == t_ms:  # the previous span had no duration
            out.pop()
        if out and out[-1].viseme == vis:
            if w > out[-1].weight:
                out[-1] = MouthCue(out[-1].t_ms, vis, w)
            continue
        out.append(MouthCue(t_ms, vis, w))
    return out


def _ms(samples: int, sample_rate: int) -> int:
    return int(round(samples * 1000 / sample_rate))


def cues_from_phonemes(
    phonemes: Sequence[tuple[str, int]], sample_rate: int, *, pcm: np.ndarray | None = None
) -> list[MouthCue]:
    """Mouth cues from Piper's ``(phoneme, n_samples)`` alignment.

    Each sounding phoneme's cue starts at the sum of the samples before it; stress marks hand
    their samples to the next phoneme, length marks and diacritics to the previous one, word
    spaces half to each side. With the segment's ``pcm`` (int16 mono), each cue's weight is
    scaled by how loud the phoneme is (``loudness_scale``): quiet, unstressed syllables are
    articulated less."""
    spans: list[tuple[int, str, float]] = []  # (start ms, viseme, weight)
    bounds: list[int] = []  # start sample of each span
    pos = 0  # samples before the current entry
    carry = 0  # samples just before the next sounding phoneme that belong to it
    for ph, n in phonemes:
        n = int(n)
        if ph in STRESS_MARKS:
            carry += n
        elif ph in WORD_BREAKS:
            if spans and spans[-1][1] != REST:
                carry += n - n // 2  # half to the next word, half stays with the last
            # after a pause (or at the start) the space is part of the pause
        elif is_modifier(ph):
            pass  # a length mark or diacritic lengthens the previous phoneme
        else:
            vis, w = viseme_for(ph)
            spans.append((_ms(pos - carry, sample_rate), vis, w))
            bounds.append(pos - carry)
            carry = 0
        pos += n
    if not spans:
        spans.append((0, REST, 1.0))
        bounds.append(0)
    if pcm is not None and len(pcm):
        bounds.append(max(pos, bounds[-1] + 1))
        x = np.asarray(pcm, dtype=np.float32) / 32768.0
        scaled = []
        for (t_ms, vis, w), a, b in zip(spans, bounds[:-1], bounds[1:], strict=True):
            seg = x[a:b]
            rms = math.sqrt(float(np.mean(seg * seg))) if seg.size else 0.0
            scaled.append((t_ms, vis, w if vis == REST else w * loudness_scale(rms)))
        spans = scaled
    return _merge(spans)


def loudness_scale(rms: float) -> float:
    """0.5..1: how much of a viseme a phoneme of this RMS level (full scale 1) gets."""
    db = 20.0 * math.log10(max(rms, 1e-6))
    return 0.5 + 0.5 * min(max((db - GATE_DBFS) / (FULL_DBFS - GATE_DBFS), 0.0), 1.0)


# -- from audio alone -------------------------------------------------------------------------

HOP_MS = 10
WIN_MS = 25
GATE_DBFS = -45.0  # quieter than this: a pause, the mouth at rest
FULL_DBFS = -16.0  # this loud or louder: full weight
MIN_RUN_MS = 40  # shorter runs are absorbed by their neighbours


def _frames(pcm: npt.NDArray[np.float32], hop: int, win: int) -> npt.NDArray[np.float32]:
    n = max(1, -(-len(pcm) // hop))
    padded = np.zeros(n * hop + win, dtype=np.float32)
    padded[win // 2 : win // 2 + len(pcm)] = pcm
    idx = np.arange(win)[None, :] + hop * np.arange(n)[:, None]
    return padded[idx]


def audio_features(pcm: np.ndarray, sample_rate: int) -> dict[str, F32]:
    """Per 10 ms hop (hop ``k`` centred on sample ``k * hop``): level in dBFS, zero-crossing
    rate, spectral centroid in Hz and the power fractions of five bands (see ``_BANDS_HZ``)."""
    x = np.asarray(pcm, dtype=np.float32) / 32768.0
    hop = max(1, sample_rate * HOP_MS // 1000)
    win = max(2, sample_rate * WIN_MS // 1000)
    fr = _frames(x, hop, win)
    rms = np.sqrt(np.mean(fr * fr, axis=1) + 1e-12)
    db = 20.0 * np.log10(rms + 1e-9)
    signs = np.signbit(fr)
    zcr = np.mean(signs[:, 1:] != signs[:, :-1], axis=1)
    n_fft = 1 << (win - 1).bit_length()
    spec = np.abs(np.fft.rfft(fr * np.hanning(win).astype(np.float32), n=n_fft, axis=1)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    voice = (freqs >= 80) & (freqs <= 8000)
    total = spec[:, voice].sum(axis=1) + 1e-12
    centroid = (spec[:, voice] * freqs[voice]).sum(axis=1) / total
    out = {
        "db": db.astype(np.float32),
        "zcr": zcr.astype(np.float32),
        "centroid": centroid.astype(np.float32),
    }
    for name, (lo, hi) in _BANDS_HZ.items():
        band = (freqs >= lo) & (freqs < hi)
        out[name] = (spec[:, band].sum(axis=1) / total).astype(np.float32)
    return out


_BANDS_HZ = {
    "low": (80.0, 450.0),  # voicing, F1 of close vowels
    "f1": (450.0, 1000.0),  # F1 of open vowels
    "f2lo": (1000.0, 1800.0),  # F2 of back vowels (a, o)
    "f2hi": (1800.0, 3500.0),  # F2 of front vowels (i, e)
    "hiss": (3500.0, 8000.0),  # fricative noise (s, f, th)
}


def _classify(f: dict[str, F32]) -> tuple[npt.NDArray[np.int64], F32]:
    """(viseme index, weight) per hop from the spectral shape and the level."""
    n = len(f["db"])
    vis = np.full(n, VISEME_INDEX[REST], dtype=np.int64)
    level = np.clip((f["db"] - GATE_DBFS) / (FULL_DBFS - GATE_DBFS), 0.0, 1.0)
    voiced = (f["zcr"] < 0.2) & (f["low"] + f["f1"] > 0.45)
    noisy = ~voiced & (f["db"] > GATE_DBFS)
    # noise: strong high hiss is s/z/sh (teeth together, EE), weaker flat noise f/v/th (FF)
    sibilant = noisy & (f["hiss"] > 0.5) & (f["db"] > GATE_DBFS + 10)
    vis[noisy] = VISEME_INDEX["FF"]
    vis[sibilant] = VISEME_INDEX["EE"]
    # voiced: F1 high -> open (AA); F2 high -> front/spread (EE); both low -> rounded; all the
    # energy below ~330 Hz and nothing above is a nasal murmur (m, n): lips closed or nearly
    openness = f["f1"] / (f["low"] + f["f1"] + 1e-6)
    front = f["f2hi"] / (f["f1"] + f["f2lo"] + f["f2hi"] + 1e-6)
    v = voiced & (f["db"] > GATE_DBFS)
    nasal = v & (f["low"] > 0.93) & (f["centroid"] < 330.0)
    v &= ~nasal
    ee = v & (front > 0.35)
    aa = v & ~ee & (openness > 0.38)
    oh = v & ~ee & ~aa & (openness > 0.1)
    oo = v & ~ee & ~aa & ~oh
    vis[ee] = VISEME_INDEX["EE"]
    vis[aa] = VISEME_INDEX["AA"]
    vis[oh] = VISEME_INDEX["OH"]
    vis[oo] = VISEME_INDEX["OO"]
    weight = np.where(vis == VISEME_INDEX[REST], 1.0, 0.35 + 0.65 * level)
    weight = np.where(noisy & ~sibilant, np.minimum(weight, 0.8), weight)
    return vis, weight.astype(np.float32)


def cues_from_audio(pcm: np.ndarray, sample_rate: int) -> list[MouthCue]:
    """Mouth cues for audio without phoneme alignments (int16 mono): quiet hops are REST,
    louder ones get a viseme from their spectral shape and a weight from their level; runs
    shorter than ``MIN_RUN_MS`` are absorbed by the longer neighbour."""
    if len(pcm) == 0:
        return [MouthCue(0, REST, 1.0)]
    vis, weight = _classify(audio_features(pcm, sample_rate))
    # runs of one viseme: [start hop, end hop)
    edges = np.flatnonzero(np.diff(vis)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(vis)]])
    runs = [[int(s), int(e), int(vis[s])] for s, e in zip(starts, ends, strict=True)]
    min_hops = max(1, MIN_RUN_MS // HOP_MS)
    changed = True
    while changed and len(runs) > 1:
        changed = False
        k = min(range(len(runs)), key=lambda i: runs[i][1] - runs[i][0])
        if runs[k][1] - runs[k][0] >= min_hops:
            break
        # absorb the shortest run into its longer neighbour, then merge equal neighbours
        left = runs[k - 1] if k > 0 else None
        right = runs[k + 1] if k + 1 < len(runs) else None
        if right is None or (left is not None and left[1] - left[0] >= right[1] - right[0]):
            assert left is not None
            left[1] = runs[k][1]
        else:
            right[0] = runs[k][0]
        del runs[k]
        merged: list[list[int]] = []
        for r in runs:
            if merged and merged[-1][2] == r[2]:
                merged[-1][1] = r[1]
            else:
                merged.append(r)
        runs = merged
        changed = True
    spans = []
    for s, e, v in runs:
        w = 1.0 if v == VISEME_INDEX[REST] else float(np.mean(weight[s:e]))
        spans.append((s * HOP_MS, VISEMES[v], round(w * 20) / 20))
    return _merge(spans)


# ---------------------------------------------------------------------------------------------
# Per-frame weights
# ---------------------------------------------------------------------------------------------

# Co-articulation (after Cohen & Massaro's dominance model): every cue pulls the mouth towards
# its target with a dominance that is flat over the middle of the cue and falls off smoothly
# around it; the mouth at time t is the dominance-weighted mean of the targets. Long cues
# reach their target, short ones only part of the way, and strong cues (lip closures, lip to
# teeth) win over their neighbours so a /b/ between two vowels still closes the lips.
PLATEAU = 0.5  # fraction of a cue's half-length where its dominance is full ...
TRANSITION_MS = 60.0  # ... or all of it but this much at each end, whichever is more
TAU_MS = 50.0  # fall-off time constant around the plateau
LEAD_MS = 15  # the mouth moves a little ahead of the sound it makes
_STRENGTH = {REST: 2.0, "FF": 1.5, "TH": 1.2, "OO": 1.1, "AA": 1.0, "EE": 1.0, "OH": 1.0}
# Contacts are held for at least about a video frame however short the phoneme (lips shut for
# /m b p/, lip on teeth for /f v/): half-width of the full-dominance plateau, ms.
_MIN_HOLD_MS = {REST: 22.0, "FF": 14.0}


def _targets(cues: Sequence[MouthCue]) -> F32:
    t = np.zeros((len(cues), len(VISEMES)), dtype=np.float32)
    for i, c in enumerate(cues):
        w = float(np.clip(c.weight, 0.0, 1.0))
        t[i, VISEME_INDEX[c.viseme]] += w
        t[i, VISEME_INDEX[REST]] += 1.0 - w
    return t


def weights_from_cues(
    cues: Sequence[MouthCue], *, n_frames: int, fps: int, duration_ms: float | None = None
) -> F32:
    """(n_frames, len(VISEMES)) viseme weights (rows sum to 1) for video frames at ``fps``;
    frame ``j`` shows the mouth for the time span ``[j/fps, (j+1)/fps)`` s of the segment."""
    if n_frames <= 0:
        return np.zeros((0, len(VISEMES)), dtype=np.float32)
    if not cues:
        out = np.zeros((n_frames, len(VISEMES)), dtype=np.float32)
        out[:, VISEME_INDEX[REST]] = 1.0
        return out
    end_ms = duration_ms if duration_ms is not None else n_frames * 1000.0 / fps
    starts = np.array([c.t_ms for c in cues], dtype=np.float64)
    ends = np.append(starts[1:], max(end_ms, starts[-1] + 1.0))
    centre = 0.5 * (starts + ends)
    half = 0.5 * (ends - starts)
    # full dominance over the middle PLATEAU of a cue, and for long cues (pauses) all but the
    # TRANSITION_MS at each end; contacts at least _MIN_HOLD_MS
    min_hold = np.array([_MIN_HOLD_MS.get(c.viseme, 0.0) for c in cues], dtype=np.float64)
    hold = np.maximum(np.maximum(PLATEAU * half, half - TRANSITION_MS), min_hold)
    strength = np.array(
        [_STRENGTH[c.viseme] * (0.45 + 0.55 * c.weight if c.viseme != REST else 1.0) for c in cues],
        dtype=np.float64,
    )
    targets = _targets(cues).astype(np.float64)
    # three samples per frame (1/4, 1/2, 3/4 of the frame), weighted 1:2:1
    frame_ms = 1000.0 / fps
    sub = np.array([0.25, 0.5, 0.75])
    t = ((np.arange(n_frames)[:, None] + sub[None, :]) * frame_ms + LEAD_MS).reshape(-1)
    out = np.empty((t.size, len(VISEMES)), dtype=np.float64)
    chunk = 512
    for a in range(0, t.size, chunk):
        tc = t[a : a + chunk, None]
        gap = np.maximum(np.abs(tc - centre[None, :]) - hold[None, :], 0.0)
        g2 = (gap / TAU_MS) ** 2
        g2 -= g2.min(axis=1, keepdims=True)  # the same ratios, without underflow in long cues
        dom = strength[None, :] * np.exp(-g2)
        out[a : a + chunk] = (dom @ targets) / dom.sum(axis=1, keepdims=True)
    rows = out.reshape(n_frames, len(sub), len(VISEMES))
    w = (rows[:, 0] + 2.0 * rows[:, 1] + rows[:, 2]) / 4.0
    return np.clip(w, 0.0, 1.0).astype(np.float32)


# Each viseme's mouth at full weight; the renderer's shape is the weighted sum of these
# (REST: the speaking mouth at rest, lips together over the teeth).
VISEME_SHAPES: dict[str, MouthShape] = {
    REST: MouthShape(press=1.0),
    "AA": MouthShape(open=0.75, width=-0.15, teeth=0.3, tongue=0.5),
    "EE": MouthShape(open=0.33, width=0.8, teeth=1.0, tongue=0.1),
    "OH": MouthShape(open=0.5, width=-0.6, press=0.3, tongue=0.2),
    "OO": MouthShape(open=0.1, width=-1.0, press=1.0),
    "FF": MouthShape(open=0.08, width=0.15, teeth=1.0, tuck=1.0),
    "TH": MouthShape(open=0.35, width=0.1, teeth=0.7, tongue=1.0),
}
_SHAPE_MATRIX = np.array(
    [[getattr(VISEME_SHAPES[v], f) for f in MouthShape.FIELDS] for v in VISEMES],
    dtype=np.float32,
)


def shape_for(weights: npt.ArrayLike, *, blend: float = 1.0) -> MouthShape:
    """The mouth for one row of viseme weights, scaled by ``blend`` (0 = the idle face).

    Only the non-REST weights need to be given correctly: whatever they leave of 1 is REST."""
    w = np.clip(np.asarray(weights, dtype=np.float32).reshape(-1), 0.0, 1.0)
    if w.size != len(VISEMES):
        raise ValueError(f"expected {len(VISEMES)} weights, got {w.size}")
    rest = max(0.0, 1.0 - float(w[1:].sum()))
    w = w.copy()
    w[0] = rest
    if rest == 0.0 and w[1:].sum() > 1.0:
        w[1:] /= w[1:].sum()
    b = float(np.clip(blend, 0.0, 1.0))
    vals = (w @ _SHAPE_MATRIX) * b
    return MouthShape(*(float(v) for v in vals))


def openness_of(weights: npt.ArrayLike) -> F32:
    """Jaw opening 0..1 for rows of viseme weights."""
    w = np.asarray(weights, dtype=np.float32)
    return np.clip(w @ _SHAPE_MATRIX[:, 0], 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The track
# ---------------------------------------------------------------------------------------------


class VisemeTrack:
    """One speech segment's mouth: viseme weights per video frame (a ``LipTrack``).

    Frame ``j`` covers samples ``[j*sr//fps, (j+1)*sr//fps)`` of the segment."""

    def __init__(
        self,
        cues: Sequence[MouthCue],
        *,
        n_frames: int,
        fps: int,
        duration_ms: float | None = None,
        source: str = "phonemes",
    ) -> None:
        self.cues: tuple[MouthCue, ...] = tuple(cues)
        self.fps = fps
        self.source = source
        w = weights_from_cues(self.cues, n_frames=n_frames, fps=fps, duration_ms=duration_ms)
        w.setflags(write=False)
        self.weights: F32 = w
        self._openness = openness_of(w)
        self._openness.setflags(write=False)

    @property
    def n_frames(self) -> int:
        return int(self.weights.shape[0])

    def at(self, j: int) -> F32:
        """Viseme weights (len(VISEMES),) for local frame ``j``, clamped to the segment."""
        if self.n_frames == 0:
            out = np.zeros(len(VISEMES), dtype=np.float32)
            out[0] = 1.0
            return out
        return self.weights[min(max(int(j), 0), self.n_frames - 1)]

    def openness(self) -> F32:
        return self._openness

    def shape_at(self, j: int, *, blend: float = 1.0) -> MouthShape:
        return shape_for(self.at(j), blend=blend)


def n_frames_for(n_samples: int, sample_rate: int, fps: int) -> int:
    """Video frames covering ``n_samples`` (the compositor's rule: a partial frame counts)."""
    return max(1, -(-n_samples * fps // sample_rate))


def track_for(audio: SpeechAudio, fps: int) -> VisemeTrack:
    """The segment's track: from Piper's phoneme alignment when there is one, else from the
    audio."""
    n = n_frames_for(len(audio.pcm), audio.sample_rate, fps)
    duration_ms = len(audio.pcm) * 1000.0 / audio.sample_rate
    if audio.phonemes:
        cues = cues_from_phonemes(audio.phonemes, audio.sample_rate, pcm=audio.pcm)
        source = "phonemes"
    else:
        cues = cues_from_audio(audio.pcm, audio.sample_rate)
        source = "audio"
    return VisemeTrack(cues, n_frames=n, fps=fps, duration_ms=duration_ms, source=source)


def frame_rms(pcm: np.ndarray, sample_rate: int, fps: int) -> F32:
    """RMS level (linear, full scale 1) of each video frame's samples."""
    x = np.asarray(pcm, dtype=np.float32) / 32768.0
    n = n_frames_for(len(x), sample_rate, fps)
    out = np.zeros(n, dtype=np.float32)
    for j in range(n):
        w = x[j * sample_rate // fps : (j + 1) * sample_rate // fps]
        out[j] = math.sqrt(float(np.mean(w * w))) if w.size else 0.0
    return out
