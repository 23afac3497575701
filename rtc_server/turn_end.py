"""When the person's turn ends, and what happens when it was ended too soon.

At the first pause of an utterance the conversation transcribes (``conversation.preemptive``);
``EndOfTurn.decide`` hands that transcript and the voice to the call's ``TurnDetector``
(``pipeline.turns``) and tells the VAD how much silence ends this utterance
(``Listener.end_after``): sooner than ``vad.end_silence_ms`` after a complete sentence or a
question, later after "and" or "um". The VAD then ends the utterance as it always does.

A turn ended sooner than the fixed silence would have ended it may have been cut: when the
person speaks again within that fixed silence of their last word, it is an **early cut-in**.
The answer already started is stopped at once (as a barge-in), the two parts are one
utterance again (``audio_for`` joins them for transcription), the answer is made for the
whole, and the count goes up (``early_cut_ins``; the turn's metrics say ``joined``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np

from pipeline.turns import TurnDecision, TurnDetector

__all__ = ["EndOfTurn"]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
KEEP_DECISIONS = 16


class EndOfTurn:
    """One call's end-of-turn decisions. ``listener``: its VAD (``end_after``); ``fixed_ms``:
    ``vad.end_silence_ms``; ``executor``: where the detector runs (never the event loop)."""

    def __init__(self, detector: TurnDetector | None, listener: Any, *, fixed_ms: int,
                 executor: Executor | None = None,
                 language: Callable[[], str | None] = lambda: None) -> None:
        self.detector = detector
        self.listener = listener
        self.fixed_ms = fixed_ms
        self.executor = executor
        self._language = language
        self.decisions: dict[int, TurnDecision] = {}  # by the pause's speech end (ms)
        self._early: tuple[int, np.ndarray] | None = None  # (end ms, audio) of an early end
        self._join: np.ndarray | None = None  # the first part of an utterance cut early
        self.early_cut_ins = 0

    async def decide(self, end_ms: int, text: str, audio: np.ndarray,
                     language: str | None) -> TurnDecision | None:
        """The silence that ends the utterance paused at ``end_ms``, told to the VAD."""
        if self.detector is None:
            return None
        lang = language or self._language()
        loop = asyncio.get_running_loop()
        decision = await loop.run_in_executor(
            self.executor, self.detector.decide, text, audio, lang)
        self.decisions[int(end_ms)] = decision
        while len(self.decisions) > KEEP_DECISIONS:
            del self.decisions[next(iter(self.decisions))]
        self.listener.end_after(int(end_ms), decision.wait_ms)
        return decision

    def ended(self, end_ms: int, audio: np.ndarray) -> TurnDecision:
        """The utterance ended (``SpeechEnd``): the decision that ended it (``fixed`` when
        none came in time). A turn ended sooner than the fixed silence is remembered, so
        speech right after it joins it."""
        decision = self.decisions.pop(int(end_ms), None)
        if decision is None:
            decision = TurnDecision(self.fixed_ms, "fixed", "no decision in time")
        self._early = (int(end_ms), audio) if decision.wait_ms < self.fixed_ms else None
        return decision

    def speech_started(self, onset_ms: int) -> bool:
        """New speech: True when it continues an utterance ended early (an early cut-in)."""
        early, self._early = self._early, None
        if early is None:
            return False
        end_ms, audio = early
        if onset_ms - end_ms >= self.fixed_ms:
            return False
        self.early_cut_ins += 1
        self._join = audio
        logger.info("early end of turn: the person went on %d ms after their last word",
                    onset_ms - end_ms)
        return True

    @property
    def joining(self) -> bool:
        return self._join is not None

    def audio_for(self, audio: np.ndarray) -> np.ndarray:
        """The utterance to transcribe: after an early cut-in, the first part and this one."""
        if self._join is None:
            return audio
        return np.concatenate([self._join, np.asarray(audio, np.float32)])

    def joined(self) -> None:
        """The joined utterance has ended: the next one stands alone."""
        self._join = None
