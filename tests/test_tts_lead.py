"""The first words of an answer start at the voice, not after the silence a voice leaves
before it (``pipeline.tts.trim_lead``)."""

from __future__ import annotations

import numpy as np

from pipeline.tts import SpeechAudio, trim_lead
from tests.fakes.speech import piper_speech

SR = 16_000


def tone(n: int) -> np.ndarray:
    return (8000 * np.sin(np.arange(n) * 2 * np.pi * 220 / SR)).astype(np.int16)


def test_the_silence_before_the_voice_goes_and_the_phonemes_lose_as_much() -> None:
    pcm = np.concatenate([np.zeros(800, np.int16), tone(4000)])  # 50 ms of silence
    audio = SpeechAudio("Hi.", pcm, SR, (("^", 600), ("_", 300), ("h", 1900), ("i", 2000)))
    out = trim_lead(audio, keep_ms=10)
    cut = 801 - 160  # the voice's first sample above 1 % is the sine's second one
    assert out.pcm.size == pcm.size - cut
    np.testing.assert_array_equal(out.pcm, pcm[cut:])  # nothing after the cut changes
    assert out.phonemes == (("_", 900 - cut), ("h", 1900), ("i", 2000))
    assert sum(n for _, n in out.phonemes) == sum(n for _, n in audio.phonemes) - cut
    assert out.text == "Hi." and out.sample_rate == SR


def test_audio_that_starts_with_its_voice_is_left_as_it_is() -> None:
    audio = SpeechAudio("A.", tone(2000), SR, (("a", 2000),))
    assert trim_lead(audio) is audio
    quiet = SpeechAudio("", np.zeros(500, np.int16), SR)
    assert trim_lead(quiet) is quiet  # all silence: nothing to start on


def test_piper_s_lead_is_cut_to_ten_ms() -> None:
    pcm = (piper_speech("I like music a lot.", SR) * 32767).astype(np.int16)
    first = int(np.flatnonzero(np.abs(pcm.astype(np.int32)) > 327)[0])
    assert first > 20 * SR // 1000  # Piper leaves more than 20 ms before the voice
    out = trim_lead(SpeechAudio("x", pcm, SR))
    assert int(np.flatnonzero(np.abs(out.pcm.astype(np.int32)) > 327)[0]) == 10 * SR // 1000


# --- the first clause of a long first sentence is said first ---------------------------------
def test_a_long_first_sentence_is_cut_after_its_first_clause():
    from pipeline.speech_units import first_clause

    long = "I can chat with you, tell you the time and the date, and do simple arithmetic."
    assert first_clause(long) == ("I can chat with you,",
                                  "tell you the time and the date, and do simple arithmetic.")
    assert first_clause("Hello! I am here.") == ("Hello! I am here.", "")  # short: whole
    sure = "Sure, I can do that for you right now without any trouble at all."
    assert first_clause(sure) == (sure, "")  # "Sure," alone is too short a piece
    persian = "من می‌توانم با شما صحبت کنم، ساعت را بگویم و حساب ساده انجام دهم."
    head, rest = first_clause(persian)
    assert head.endswith("،") and f"{head} {rest}" == persian


async def test_an_answer_starts_on_its_first_clause_and_carries_its_whole_text():
    from pipeline.lipsync.viseme_engine import VisemeEngine
    from pipeline.speaking import Speaker
    from tests.fakes.tts import ToneTTS

    tts = ToneTTS()
    speaker = Speaker(tts, VisemeEngine(), fps=25, owner="s", executor=None)
    segments = []

    async def room() -> None:
        return None

    long = "I can chat with you, tell you the time and the date, and do simple arithmetic."
    await speaker.speak(long, schedule=segments.append, room=room, answer_start=True)
    assert tts.requests == ["I can chat with you,",
                            "tell you the time and the date, and do simple arithmetic."]
    assert [s.text for s in segments] == [long, ""]  # the transcript goes with the first
    tts.requests.clear()
    await speaker.speak(long, schedule=segments.append, room=room)  # later sentences: whole
    assert tts.requests == [long]
