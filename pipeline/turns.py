"""End of turn: how much silence ends the person's turn, from what they said and how.

A turn used to end after a fixed silence (``vad.end_silence_ms``, 600 ms). At the first pause
(``vad.pause_ms``) the server already transcribes; a ``TurnDetector`` reads that transcript and
the end of the voice and says how long the silence must last:

* ``short`` (``turns.short_ms``, 250 ms): a complete sentence or a question, and a voice that
  fell at the end (or did not rise and hold);
* ``long`` (``turns.long_ms``, 900 ms): it ends on a conjunction or a filler ("and",
  "because", "so", "um", "uh", "I mean", Persian "و", "که", "چون", ...), on a word that
  cannot end a clause ("the", "to", ...), an opening clause without its main clause ("If it
  rains tomorrow.", "When I was young."), a request without its verb ("Could you please"),
  without a sentence's end, or the voice rose and held;
* ``fixed`` (``vad.end_silence_ms``): nothing to judge by (another language, no text).

``RuleTurnDetector`` is the embedded default (English and Persian). ``OnnxTurnDetector``
loads a classifier from a path (never downloaded): inputs ``audio`` (float32 [1, 32000]: the
last 2 s of the utterance at 16 kHz, left-padded with zeros) and/or ``text`` (int64 [1, 64]:
the transcript's last 64 UTF-8 bytes, left-padded with zeros), output ``end_probability``
(float32, any shape with one element); at or above ``turns.model_threshold`` the turn ends
after the short silence, else the long one.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from common.errors import PipelineError

if TYPE_CHECKING:
    from config import Settings

__all__ = ["OnnxTurnDetector", "RuleTurnDetector", "TurnDecision", "TurnDetector",
           "pitch_contour", "stt_language", "turn_detector", "voice_ending"]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
SAMPLE_RATE = 16_000
MODEL_AUDIO = 2 * SAMPLE_RATE
MODEL_TEXT = 64


@dataclass(frozen=True, slots=True)
class TurnDecision:
    """How long a silence ends the turn (``wait_ms``, from the end of the voice) and the rule
    that chose it (``short``, ``long``, ``fixed``, ``model``), with what it saw."""

    wait_ms: int
    rule: str
    reason: str


class TurnDetector(Protocol):
    def decide(self, text: str, audio: F32, language: str | None) -> TurnDecision:
        """``text``: the transcript so far; ``audio``: the utterance (float32 16 kHz, up to
        the end of the voice); ``language``: ISO code, or None when unknown."""
        ...


# --- the voice at the end ------------------------------------------------------------------------
def pitch_contour(audio: F32, *, frame_ms: int = 40, hop_ms: int = 20, fmin: float = 70.0,
                  fmax: float = 400.0) -> F32:
    """F0 in Hz per frame (0 where unvoiced), by normalised autocorrelation (FFT, all the
    frames at once: about a millisecond for 3 s of audio)."""
    x = np.asarray(audio, np.float32).reshape(-1)
    n, hop = SAMPLE_RATE * frame_ms // 1000, SAMPLE_RATE * hop_ms // 1000
    if x.size < n:
        return np.zeros(0, np.float32)
    lo, hi = int(SAMPLE_RATE / fmax), int(SAMPLE_RATE / fmin)
    frames = x[np.arange(0, x.size - n + 1, hop)[:, None] + np.arange(n)].astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    energy = (frames * frames).sum(axis=1)
    ac = np.fft.irfft(np.abs(np.fft.rfft(frames, 2 * n, axis=1)) ** 2, axis=1)[:, :n]
    ac /= ac[:, :1] + 1e-12
    lags = lo + np.argmax(ac[:, lo:hi], axis=1)
    peak = ac[np.arange(ac.shape[0]), lags]
    voiced = (energy >= 1e-4 * n) & (peak > 0.45)
    return np.where(voiced, SAMPLE_RATE / lags, 0.0).astype(np.float32)


def voice_ending(audio: F32) -> str:
    """``fell`` (the last voiced 100 ms lower than 200-500 ms before), ``rose_held`` (the
    last 300 ms steady and higher than 600-1000 ms before), ``flat`` or ``unknown``."""
    f0 = pitch_contour(np.asarray(audio, np.float32)[-3 * SAMPLE_RATE:])
    voiced = f0[f0 > 0]  # 20 ms a frame
    if voiced.size < 25:
        return "unknown"
    if float(np.median(voiced[-5:]) / np.median(voiced[-25:-10])) < 0.95:
        return "fell"
    if voiced.size >= 50:
        held, earlier = voiced[-15:], voiced[-50:-30]
        if (float(np.median(held) / np.median(earlier)) > 1.06
                and float(np.ptp(held) / np.median(held)) < 0.08):
            return "rose_held"
    return "flat"


# --- the rules -----------------------------------------------------------------------------------
_EN_CONTINUE = {
    "and", "but", "or", "so", "because", "cause", "cuz", "since", "although", "though",
    "if", "unless", "when", "while", "then", "that", "which", "who", "whose", "where",
    "um", "uh", "er", "erm", "hmm", "mm", "like", "well",
    "the", "a", "an", "to", "of", "for", "with", "in", "on", "at", "from", "by", "about",
    "my", "your", "his", "her", "our", "their", "its", "is", "are", "was", "were", "am",
    "i", "we", "you", "they", "he", "she", "it's", "i'm", "very", "really", "just",
}
_EN_CONTINUE_PHRASES = ("i mean", "you know", "kind of", "sort of", "and then", "so that")
_EN_QUESTION = {"what", "who", "whom", "whose", "where", "when", "why", "how", "which", "is",
                "are", "was", "were", "do", "does", "did", "can", "could", "would", "will",
                "should", "shall", "may", "might", "have", "has", "had"}
# a sentence opening with one of these is a clause that needs its main clause ("If it rains
# tomorrow." is not an answerable turn), unless it is a question ("When does it open?")
_EN_OPENING = {"if", "when", "because", "although", "though", "unless", "while", "since",
               "before", "after", "whenever", "once", "as"}
_EN_REQUEST = {"could", "can", "would", "will"}  # "... you please" still needs its verb
_FA_OPENING = {"اگر", "اگه", "وقتی", "وقتیکه", "چون", "هرچند", "درحالیکه", "زمانی"}
_FA_CONTINUE = {"و", "که", "اما", "ولی", "چون", "یا", "اگر", "تا", "بعد", "پس", "یعنی", "خب",
                "اِ", "ام", "اوم", "مثلا", "مثلاً", "را", "رو", "به", "از", "با", "در", "برای"}
_FA_QUESTION = {"چرا", "چی", "چه", "کجا", "کی", "چطور", "چطوری", "آیا", "کدام", "کدوم", "چند"}
_WORD = re.compile(r"[\w'\u0600-\u06FF\u200c]+", re.UNICODE)


class RuleTurnDetector:
    """The embedded rules (English, Persian); other languages get the fixed silence."""

    def __init__(self, *, short_ms: int = 250, long_ms: int = 900, fixed_ms: int = 600) -> None:
        self.short_ms, self.long_ms, self.fixed_ms = short_ms, long_ms, fixed_ms

    def decide(self, text: str, audio: F32, language: str | None) -> TurnDecision:
        lang = (language or "en").lower()
        if lang not in ("en", "fa"):
            return TurnDecision(self.fixed_ms, "fixed", f"no rules for language {lang!r}")
        clean = text.strip().lower()
        words = _WORD.findall(clean)
        if not words:
            return TurnDecision(self.fixed_ms, "fixed", "no words")
        continuing = _FA_CONTINUE if lang == "fa" else _EN_CONTINUE
        tail2 = " ".join(words[-2:])
        if words[-1] in continuing or (lang == "en" and tail2 in _EN_CONTINUE_PHRASES):
            return TurnDecision(self.long_ms, "long", f"ends on {words[-1]!r}")
        if clean.endswith(("...", "…", ",", "،", "-", "—")):
            return TurnDecision(self.long_ms, "long", "an unfinished clause")
        opening = _FA_OPENING if lang == "fa" else _EN_OPENING
        if (words[0] in opening and not clean.endswith(("?", "؟")) and "," not in clean
                and "،" not in clean and len(words) <= 8):
            return TurnDecision(self.long_ms, "long",
                                f"a clause opened by {words[0]!r} without its main clause")
        if (lang == "en" and len(words) >= 3 and words[-1] == "please" and words[-2] == "you"
                and words[-3] in _EN_REQUEST):
            return TurnDecision(self.long_ms, "long", "a request without its verb")
        voice = voice_ending(audio)
        if voice == "rose_held":
            return TurnDecision(self.long_ms, "long", "the voice rose and held")
        questions = _FA_QUESTION if lang == "fa" else _EN_QUESTION
        question = clean.endswith(("?", "؟")) or words[0] in questions or (
            lang == "fa" and any(w in _FA_QUESTION for w in words))
        complete = clean.endswith((".", "!", "?", "؟", "۔")) and len(words) >= 2
        if question or complete:
            kind = "a question" if question else "a complete sentence"
            return TurnDecision(self.short_ms, "short", f"{kind}, voice {voice}")
        return TurnDecision(self.fixed_ms, "fixed", "no sentence end")


class OnnxTurnDetector:
    """An end-of-turn classifier from ``path`` (see the module's doc for its inputs)."""

    def __init__(self, path: Path, *, short_ms: int = 250, long_ms: int = 900,
                 threshold: float = 0.5) -> None:
        import onnxruntime as ort

        if not Path(path).is_file():
            raise PipelineError(f"turns.model: no file at {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - whatever ONNX Runtime says: one line
            raise PipelineError(f"turns.model: {path} does not load: {exc}") from None
        self.inputs = {i.name for i in self.session.get_inputs()}
        if not self.inputs or not self.inputs <= {"audio", "text"}:
            raise PipelineError(f"turns.model: {Path(path).name} has inputs "
                                f"{sorted(self.inputs)}; expected 'audio' and/or 'text'")
        self.short_ms, self.long_ms, self.threshold = short_ms, long_ms, threshold

    def decide(self, text: str, audio: F32, language: str | None) -> TurnDecision:
        feeds: dict[str, np.ndarray] = {}
        if "audio" in self.inputs:
            a = np.asarray(audio, np.float32).reshape(-1)[-MODEL_AUDIO:]
            feeds["audio"] = np.pad(a, (MODEL_AUDIO - a.size, 0))[None]
        if "text" in self.inputs:
            b = np.frombuffer(text.strip().encode("utf-8")[-MODEL_TEXT:], np.uint8)
            feeds["text"] = np.pad(b.astype(np.int64), (MODEL_TEXT - b.size, 0))[None]
        p = float(np.asarray(self.session.run(None, feeds)[0]).reshape(-1)[0])
        wait = self.short_ms if p >= self.threshold else self.long_ms
        return TurnDecision(wait, "model", f"end probability {p:.2f}")


def stt_language(settings: Settings) -> str | None:
    """The language the person speaks, when the settings say it (``stt.language``, or an
    English-only Whisper model); None: Whisper detects it per utterance."""
    if settings.stt.language:
        return settings.stt.language
    return "en" if settings.stt.model.endswith(".en") else None


def turn_detector(settings: Settings) -> TurnDetector | None:
    """The ``turns`` section's detector (None: ``off``). A model is loaded once per process."""
    t = settings.turns
    if t.detector == "off":
        return None
    if t.detector == "model":
        assert t.model is not None
        return _onnx_detector(t.model, t.short_ms, t.long_ms, t.model_threshold)
    return RuleTurnDetector(short_ms=t.short_ms, long_ms=t.long_ms,
                            fixed_ms=settings.vad.end_silence_ms)


@functools.lru_cache(maxsize=4)
def _onnx_detector(path: str, short_ms: int, long_ms: int, threshold: float) -> OnnxTurnDetector:
    return OnnxTurnDetector(Path(path), short_ms=short_ms, long_ms=long_ms, threshold=threshold)
