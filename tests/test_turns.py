"""Answer sooner (issue 24): the end of the person's turn depends on what they said and how.
The rules (English, Persian, the voice's end), a classifier model the test builds, the VAD
ending an utterance after the chosen silence, and a continuation after an early end joining
the two parts into one turn whose first answer is cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from config import ConfigError, load_settings
from pipeline.turns import OnnxTurnDetector, RuleTurnDetector, turn_detector, voice_ending
from pipeline.vad import Endpointer, SpeechEnd, SpeechPause, SpeechStart
from tests.test_conversation import CountingReplier, CountingSTT, Host, settle

SR = 16000


def tone(f0: np.ndarray) -> np.ndarray:
    """A voiced sound following the pitch contour ``f0`` (Hz per sample)."""
    phase = np.cumsum(2 * np.pi * f0 / SR)
    return (0.3 * sum(np.sin(k * phase) / k for k in range(1, 6))).astype(np.float32)


N = 2 * SR
FALLING = tone(np.concatenate([np.full(N - 8000, 180.0), np.linspace(180, 130, 8000)]))
RISING_HELD = tone(np.concatenate([np.full(N - 12000, 150.0), np.linspace(150, 200, 4000),
                                   np.full(8000, 200.0)]))
LEVEL = tone(np.full(N, 160.0))


def test_the_voice_at_the_end_fell_rose_and_held_or_neither():
    assert voice_ending(FALLING) == "fell"
    assert voice_ending(RISING_HELD) == "rose_held"
    assert voice_ending(LEVEL) == "flat"
    assert voice_ending(np.zeros(N, np.float32)) == "unknown"


@pytest.mark.parametrize("text, audio, lang, rule", [
    ("What time is it?", LEVEL, "en", "short"),
    ("I went to the market yesterday.", FALLING, "en", "short"),
    ("Can you help me", FALLING, "en", "short"),  # a question, punctuated or not
    ("I went to the market and", FALLING, "en", "long"),
    ("I stayed home because", LEVEL, "en", "long"),
    ("So, um", LEVEL, "en", "long"),
    ("It was, I mean", LEVEL, "en", "long"),
    ("I would like to go to the", FALLING, "en", "long"),
    ("We were thinking,", LEVEL, "en", "long"),
    ("I went to the market yesterday.", RISING_HELD, "en", "long"),  # rose and held
    ("I went to the market yesterday", LEVEL, "en", "fixed"),  # no sentence end
    ("If it rains tomorrow.", FALLING, "en", "long"),  # a clause waiting for its main one
    ("When I was young.", FALLING, "en", "long"),
    ("When does the shop open?", FALLING, "en", "short"),  # ... but a question is whole
    ("If it rains tomorrow, we will stay inside.", FALLING, "en", "short"),
    ("Could you please?", FALLING, "en", "long"),  # a request without its verb
    ("Could you please help me?", FALLING, "en", "short"),
    ("اگر فردا باران بیاید.", FALLING, "fa", "long"),
    ("دیروز به بازار رفتم.", FALLING, "fa", "short"),
    ("ساعت چند است؟", LEVEL, "fa", "short"),
    ("دیروز به بازار رفتم و", FALLING, "fa", "long"),
    ("نیامدم چون", LEVEL, "fa", "long"),
    ("Je suis allé au marché.", FALLING, "fr", "fixed"),  # no rules: the fixed silence
    ("", FALLING, "en", "fixed"),
])
def test_each_rule_picks_its_silence(text, audio, lang, rule):
    detector = RuleTurnDetector(short_ms=250, long_ms=900, fixed_ms=600)
    decision = detector.decide(text, audio, lang)
    assert decision.rule == rule, decision
    assert decision.wait_ms == {"short": 250, "long": 900, "fixed": 600}[rule]


def end_of_turn_model(path: Path) -> Path:
    """A classifier with the contract's text input: the turn is over when the text's last
    byte is '.', '?' or '!' (probability 1), else not (0)."""
    import onnx
    from onnx import TensorProto, helper

    last = helper.make_tensor("last", TensorProto.INT64, [1], [63])
    ends = helper.make_tensor("ends", TensorProto.INT64, [3], [46, 63, 33])
    nodes = [
        helper.make_node("Gather", ["text", "last"], ["tail"], axis=1),  # [1, 1]
        helper.make_node("Equal", ["tail", "ends"], ["hits"]),  # [1, 3]
        helper.make_node("Cast", ["hits"], ["hits_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["hits_f"], ["end_probability"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "end_of_turn",
        [helper.make_tensor_value_info("text", TensorProto.INT64, [1, 64])],
        [helper.make_tensor_value_info("end_probability", TensorProto.FLOAT, [])],
        initializer=[last, ends])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_a_model_file_decides_through_the_same_seam(tmp_path):
    path = end_of_turn_model(tmp_path / "eot.onnx")
    detector = OnnxTurnDetector(path, short_ms=250, long_ms=900)
    assert detector.decide("What time is it?", LEVEL, "en").wait_ms == 250
    assert detector.decide("I went to the market and", LEVEL, "en").wait_ms == 900
    assert detector.decide("x" * 200 + ".", LEVEL, None).rule == "model"
    settings = load_settings(env={}, overrides={"turns.detector": "model",
                                                "turns.model": str(path)})
    assert isinstance(turn_detector(settings), OnnxTurnDetector)
    with pytest.raises(ConfigError, match="turns.model"):
        load_settings(env={}, overrides={"turns.detector": "model"})
    from common.errors import PipelineError

    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(PipelineError, match="turns.model"):
        OnnxTurnDetector(tmp_path / "bad.onnx")


def feed(ep: Endpointer, probs: list[float]) -> list[tuple[int, object]]:
    """(ms after which chunk, event) for each event."""
    out = []
    for p in probs:
        for e in ep.feed(p):
            out.append((ep.time_ms, e))
    return out


@pytest.mark.parametrize("wait_ms, ends_after_ms", [(256, 256), (896, 896), (None, 608)])
def test_the_vad_ends_the_utterance_after_the_chosen_silence(wait_ms, ends_after_ms):
    ep = Endpointer(min_speech_ms=96, end_silence_ms=600, pause_ms=160)
    events = feed(ep, [0.9] * 20)  # 640 ms of speech
    assert isinstance(events[0][1], SpeechStart)
    events = feed(ep, [0.0] * 6)  # the pause: 192 ms
    (t, pause), = [(t, e) for t, e in events if isinstance(e, SpeechPause)]
    if wait_ms is not None:
        ep.end_after(pause.end_ms, wait_ms)  # the detector's answer
    events = feed(ep, [0.0] * 40)
    (t_end, end), = [(t, e) for t, e in events if isinstance(e, SpeechEnd)]
    assert t_end - end.end_ms == ends_after_ms


def test_a_decision_for_an_older_pause_changes_nothing():
    ep = Endpointer(min_speech_ms=96, end_silence_ms=600, pause_ms=160)
    feed(ep, [0.9] * 20 + [0.0] * 6)
    old_end = 640
    feed(ep, [0.9] * 10)  # speech resumed: a new end will come
    ep.end_after(old_end, 100)
    events = feed(ep, [0.0] * 40)
    (t_end, end), = [(t, e) for t, e in events if isinstance(e, SpeechEnd)]
    assert t_end - end.end_ms == 608  # the fixed silence (in 32 ms chunks)


class DecidingMic:
    """The VAD listener's clock and its ``end_after`` (what the detector told it)."""

    time_ms = 0

    def __init__(self) -> None:
        self.told: list[tuple[int, int]] = []

    def end_after(self, end_ms: int, silence_ms: int) -> None:
        self.told.append((end_ms, silence_ms))


async def test_a_continuation_after_an_early_end_joins_the_turns_and_cuts_the_first_answer():
    from pipeline.lipsync.viseme_engine import VisemeEngine
    from pipeline.speaking import Speaker
    from rtc_server.conversation import Conversation
    from tests.fakes.tts import ToneTTS

    settings = load_settings(env={})
    host, mic, stt, replier = Host(), DecidingMic(), CountingSTT(), CountingReplier()
    conv = Conversation(
        host, settings=settings, replier=replier, stt=stt, listener=mic, resampler=None,
        speaker=Speaker(ToneTTS(), VisemeEngine(), fps=25, owner=host.id, executor=None),
        turn_detector=RuleTurnDetector(short_ms=250, long_ms=900, fixed_ms=600))
    first, second = np.full(16000, 0.1, np.float32), np.full(8000, 0.2, np.float32)
    stt.text = "I went to the market."
    conv._on_vad_event(SpeechStart(0, 250))
    mic.time_ms = 1160
    conv._on_vad_event(SpeechPause(first, 0, 1000))
    await settle(conv)
    assert mic.told == [(1000, 250)]  # a complete sentence: a short silence ends it
    mic.time_ms = 1250
    conv._on_vad_event(SpeechEnd(first, 0, 1000, 1250))
    await settle(conv)
    assert replier.calls == ["I went to the market."]
    assert len(host.scheduled) >= 1 and conv.history[0]["content"] == "I went to the market."
    cuts = host.cuts
    # ... but the person goes on 400 ms after their last word (within the fixed 600 ms)
    mic.time_ms = 1500
    conv._on_vad_event(SpeechStart(1400, 1500))
    assert host.cuts > cuts  # the answer already started is cut at once
    assert conv._eot.early_cut_ins == 1 and conv.history == []  # no half turn remembered
    stt.text = "I went to the market and bought some apples."
    heard: list[int] = []
    original = stt.transcribe

    async def transcribe(audio16k):
        heard.append(len(audio16k))
        return await original(audio16k)

    stt.transcribe = transcribe
    mic.time_ms = 2400
    conv._on_vad_event(SpeechEnd(second, 1400, 2000, 2600))
    await settle(conv)
    # the whole utterance was transcribed (both parts) and answered once more, as one turn
    assert heard == [len(first) + len(second)]
    assert replier.calls == ["I went to the market.",
                             "I went to the market and bought some apples."]
    assert [m["content"] for m in conv.history if m["role"] == "user"] == [
        "I went to the market and bought some apples."]
    conv.on_playout(host.scheduled[-1].tag)
    metrics = [e for e in host.events if e["type"] == "metrics"][-1]
    assert metrics["joined"] == 1.0 and metrics["end_rule"] == "fixed"
    await conv.aclose()
