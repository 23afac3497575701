"""A fake TextToSpeech: a tone whose length follows the text, instantly, no model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable

import numpy as np

from pipeline.tts import SpeechAudio


class ToneTTS:
    def __init__(self, *, sample_rate: int = 48000, ms_per_char: int = 40) -> None:
        self.sample_rate = sample_rate
        self.ms_per_char = ms_per_char
        self.requests: list[str] = []
        self.owners: list[tuple[Hashable | None, bool]] = []  # (owner, live) per request

    async def sentences(
        self, text: str, *, owner: Hashable | None = None, live: bool = True
    ) -> AsyncIterator[SpeechAudio]:
        self.requests.append(text)
        self.owners.append((owner, live))
        for sentence in [s for s in text.split(".") if s.strip()]:
            n = len(sentence) * self.ms_per_char * self.sample_rate // 1000
            t = np.arange(n) / self.sample_rate
            pcm = (np.sin(2 * np.pi * 220 * t) * 12000).astype(np.int16)
            yield SpeechAudio(text=sentence, pcm=pcm, sample_rate=self.sample_rate)
