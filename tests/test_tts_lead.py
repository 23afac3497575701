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


# --- an answer's first sentence is heard before its end is decoded ----------------------------
def _quiet_config():
    from piper import SynthesisConfig

    return SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)  # the same samples every run


def test_the_first_sentence_comes_in_two_pieces_that_join_to_the_whole() -> None:
    """Piper's model runs as text side and vocoder; the first 32 latent frames are decoded
    and handed on before the rest. The two pieces join to what the whole decode gives (the
    same samples up to the gain), the phonemes are shared between them, and a short
    sentence is not split."""
    from pipeline.tts import FIRST_PIECE_FRAMES, PEAK_HEADROOM, _split_phonemes
    from tests.fakes.speech import _tts

    tts = _tts(48_000)
    assert tts._split() is not None
    text = "It is twelve o'clock in Paris, and the sun is shining."
    calibrated = tts._peak_ref
    assert 0.2 < calibrated < 1.0  # set at load from the calibration phrases
    tts._peak_ref = 1.0 / PEAK_HEADROOM  # a known gain for the streamed start: 1 (raw samples)
    try:
        head, tail = list(tts._streamed(text, _quiet_config()))
    finally:
        tts._peak_ref = calibrated
    (whole,) = list(tts._streamed(text, _quiet_config(), whole=True))
    assert head.continued and not tail.continued
    # 32 frames of 256 samples at 22050 Hz, at 48 kHz (the resampler's delay goes to the tail)
    assert abs(len(head.pcm) - FIRST_PIECE_FRAMES * 256 * 48_000 // 22_050) < 64
    joined = np.concatenate([head.pcm, tail.pcm]).astype(np.float64)
    ref = whole.pcm.astype(np.float64)
    assert abs(len(joined) - len(ref)) <= 2
    n = min(len(joined), len(ref))
    scale = float(np.dot(joined[:n], ref[:n]) / np.dot(joined[:n], joined[:n]))
    err = ref[:n] - scale * joined[:n]
    snr = 10 * np.log10(np.sum(ref[:n] ** 2) / np.sum(err ** 2))
    assert snr > 40, snr  # int16 rounding at two gains, nothing more
    # raw samples against Piper's scaling to the sentence's own peak: the raw peak, below 1
    assert 0.3 < 1 / scale < 1.0
    # the phonemes: the same sequence and samples, the one at the cut in both pieces
    split_at = len(head.pcm)
    h, t = _split_phonemes(whole.phonemes, split_at)
    assert [p for p, _ in head.phonemes] == [p for p, _ in h]
    assert [p for p, _ in tail.phonemes] == [p for p, _ in t]
    assert abs(sum(n for _, n in head.phonemes) - split_at) < 64
    (short,) = list(tts._streamed("Hi there.", _quiet_config()))
    assert not short.continued


async def test_a_continued_piece_ends_on_a_video_frame_and_nothing_is_lost() -> None:
    """Every segment starts on a video frame, so a piece the next one continues is cut on a
    frame boundary and its rest goes in front of the next: the segments' samples are the
    voice's samples, in order, with no gap."""
    from pipeline.lipsync.viseme_engine import VisemeEngine
    from pipeline.speaking import Speaker

    sr, fps = 48_000, 25
    rng = np.random.default_rng(3)
    voice = (rng.standard_normal(50_000) * 3000).astype(np.int16)
    voice[:2000] = 0  # the lead an answer start loses (down to 10 ms)

    class StreamingTTS:
        sample_rate = sr

        def __init__(self) -> None:
            self.asked: list[bool] = []

        async def sentences(self, text: str, *, stream_first: bool = False):
            self.asked.append(stream_first)
            cuts = (0, 17_799, 20_000, 50_000) if stream_first else (0, 50_000)
            for a, b in zip(cuts[:-1], cuts[1:], strict=False):
                yield SpeechAudio(text, voice[a:b], sr, (("a", b - a),),
                                  continued=b < 50_000)

    tts = StreamingTTS()
    speaker = Speaker(tts, VisemeEngine(), fps=fps, owner="s", executor=None)
    segments = []

    async def room() -> None:
        return None

    await speaker.speak("Hi.", schedule=segments.append, room=room, answer_start=True)
    assert tts.asked == [True]
    step = sr // fps
    assert len(segments) == 3
    assert all(len(s.pcm) % step == 0 for s in segments[:-1])  # each starts on a frame
    out = np.concatenate([s.pcm for s in segments])
    loud = int(np.flatnonzero(np.abs(voice.astype(np.int32)) > 327)[0])
    assert np.array_equal(out, voice[loud - 10 * sr // 1000:])  # less the lead, 10 ms kept
    await speaker.speak("Hi.", schedule=segments.append, room=room)  # not an answer's start
    assert tts.asked == [True, False]


def test_piper_runs_on_the_calling_thread_without_a_thread_pool() -> None:
    """Every ONNX Runtime session of Piper runs on the thread that calls it: loading and
    synthesizing starts no thread (a pool, even an idle one, slows Whisper's transcriptions
    in the same process; pipeline/tts.py)."""
    import os

    from pipeline.piper_model import SplitModel
    from pipeline.tts import PiperTTS

    def tasks() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    before = tasks()
    tts = PiperTTS(sample_rate=48_000)
    tts.load()
    text = "Good morning to you, my friend, and welcome. How are you today?"
    streamed = list(tts._iter_sentences(text, stream_first=True))
    whole = list(tts.synthesize(text))
    new = tasks() - before
    assert len(streamed) > len(whole) >= 2  # the streamed path ran, in pieces
    assert not new, [open(f"/proc/self/task/{t}/comm").read().strip() for t in new]
    split = tts._split()
    assert isinstance(split, SplitModel)
    for session in (split._front, split._vocoder):
        options = session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def test_without_noise_a_text_gives_the_same_samples_every_run() -> None:
    """``PiperTTS(noise=False)``: Piper's sampling noise off, for tests that hold speech to
    thresholds; with the voice's own noise two runs of a sentence differ."""
    from pipeline.tts import PiperTTS

    text = "The weather is fine where you are."
    quiet = PiperTTS(noise=False)
    noisy = PiperTTS()
    first, again = ([s.pcm for s in quiet._iter_sentences(text)] for _ in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    one, two = ([s.pcm for s in noisy._iter_sentences(text)] for _ in range(2))
    assert not all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
