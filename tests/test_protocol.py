"""The control channel's typed protocol: messages in parse to models, events out serialise to
the JSON objects the page reads, and both speaking paths are one."""

from __future__ import annotations

import asyncio

import pytest

from rtc_server.protocol import (
    MAX_CLAPPER_COUNT,
    Chat,
    Clapper,
    Closing,
    Error,
    Hello,
    Interrupt,
    Metrics,
    Refused,
    Say,
    State,
    Transcript,
    parse_control,
    with_turn,
)


def parse(raw: object) -> object:
    return parse_control(raw, max_json_depth=32, max_chat_chars=100)


def test_each_message_parses_to_its_model():
    assert parse('{"type": "say", "text": "Hello\\tthere"}') == Say("Hello there")
    assert parse(b'{"type": "chat", "text": "hi"}') == Chat("hi")
    assert parse('{"type": "interrupt"}') == Interrupt()
    assert parse('{"type": "clapper"}') == Clapper(5)
    assert parse('{"type": "clapper", "count": 12}') == Clapper(12)


@pytest.mark.parametrize(
    ("raw", "refused"),
    [
        ("[1]", Refused("control messages must be JSON objects")),
        ('{"type": "say"}', Refused("say needs a non-empty 'text' string", "text")),
        ('{"type": "say", "text": "\\u0007"}', Refused("say needs a non-empty 'text' string",
                                                      "text")),
        ('{"type": "say", "text": "..."}',
         Refused("say text has nothing to speak (no letter or digit)", "text")),
        ('{"type": "chat", "text": "' + "a" * 101 + '"}',
         Refused("chat text is over 100 characters", "text")),
        ('{"type": "clapper", "count": true}',
         Refused(f"clapper 'count' must be an integer 1..{MAX_CLAPPER_COUNT}", "count")),
        ('{"type": "clapper", "count": 601}',
         Refused(f"clapper 'count' must be an integer 1..{MAX_CLAPPER_COUNT}", "count")),
        ('{"type": "dance"}', Refused("unknown message type 'dance'", "type")),
        ('{"text": "hi"}', Refused("control messages need a 'type' string", "type")),
    ],
)
def test_bad_messages_are_refused_naming_the_field(raw, refused):
    assert parse(raw) == refused


def test_json_the_decoder_refuses_is_refused_with_its_reason():
    out = parse('{"type": "say", "text": NaN}')
    assert isinstance(out, Refused) and out.message.startswith(
        "control messages must be JSON objects (")
    deep = parse("[" * 40 + "]" * 40)
    assert isinstance(deep, Refused) and "deep" in deep.message


def test_events_serialise_to_the_objects_the_page_reads():
    assert Hello("s1", "default", 25, 512, 512, 48000).to_wire() == {
        "type": "hello", "session_id": "s1", "avatar_id": "default", "fps": 25,
        "width": 512, "height": 512, "sample_rate": 48000}
    assert State("listening", user="speaking").to_wire() == {
        "type": "state", "state": "listening", "user": "speaking"}
    assert State("thinking").to_wire() == {"type": "state", "state": "thinking"}
    assert Transcript("assistant", "Hi.").to_wire() == {
        "type": "transcript", "role": "assistant", "text": "Hi.", "final": True}
    assert with_turn(Transcript("user", "hi", source="voice", language="en"), 3).to_wire() == {
        "type": "transcript", "role": "user", "text": "hi", "final": True, "source": "voice",
        "language": "en", "turn": 3}
    assert with_turn(Metrics("chat", {"stt_ms": 1.5}), 2).to_wire() == {
        "type": "metrics", "source": "chat", "stt_ms": 1.5, "turn": 2}
    assert Error("nope", stage="control", field="text").to_wire() == {
        "type": "error", "message": "nope", "fatal": False, "stage": "control",
        "field": "text"}
    assert Error("bad", fatal=True).to_wire() == {"type": "error", "message": "bad",
                                                  "fatal": True}
    assert Closing("idle", "quiet").to_wire() == {"type": "closing", "reason": "idle",
                                                  "detail": "quiet"}
    assert with_turn(State("thinking"), 4) == State("thinking")  # states carry no turn


async def test_say_and_the_conversation_speak_through_the_same_speaker(monkeypatch, tmp_path):
    from config import load_settings
    from face.library import AvatarLibrary
    from pipeline.lipsync.viseme_engine import VisemeEngine
    from pipeline.speaking import Speaker
    from rtc_server.session import Session
    from tests.fakes.tts import ToneTTS

    spoken: list[str] = []
    real = Speaker.speak

    async def spy(self, text, **kw):
        spoken.append(text)
        await real(self, text, **kw)

    monkeypatch.setattr(Speaker, "speak", spy)
    library = AvatarLibrary(data_dir=tmp_path, width=256, height=256)
    session = Session(
        settings=load_settings(env={}, overrides={
            "conversation.listen": False, "media.video_width": 256, "media.video_height": 256}),
        avatar=library.get("default"), tts=ToneTTS(), lipsync=VisemeEngine(),
        render_executor=None, on_closed=lambda s: None,
    )
    try:
        assert session.conversation.speaker is session.speaker
        await session._speak("Hello there.")
        assert session.compositor.pending_of("speech") >= 1  # the say was scheduled
        session.conversation.chat("What is your name?")
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(spoken) >= 2:
                break
        assert spoken[0] == "Hello there." and len(spoken) >= 2  # the reply's first sentence
    finally:
        await session.aclose("test over")
