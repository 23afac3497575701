"""The ``control`` data channel's protocol: every message in and every event out, as a typed
model with a literal ``type``, parsed and serialised here and nowhere else.

In (from the page or bot): ``say {text}``, ``chat {text}``, ``interrupt``, ``clapper {count}``.
:func:`parse_control` turns raw bytes or text into one of those models, or a :class:`Refused`
that names the field; the decoding goes through :func:`common.inputs.loads_json` (depth limit,
no NaN/Infinity) before any field is read.

Out (to the page): ``hello``, ``state``, ``transcript``, ``metrics``, ``error``, ``closing``.
:meth:`Event.to_wire` gives the JSON object sent; optional fields left None are not sent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from common.inputs import JsonRejected, clean_text, has_speakable, loads_json, short

MAX_SAY_CHARS = 2000
# a clapper is an A/V sync test: one at a time per call, at most 10 minutes of beeps
MAX_CLAPPER_COUNT = 600
DEFAULT_CLAPPER_COUNT = 5

# --- messages in -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Say:
    """Speak ``text`` as it is (queued behind earlier says)."""

    text: str
    type: ClassVar[str] = "say"


@dataclass(frozen=True, slots=True)
class Chat:
    """A typed turn of the conversation: the replier answers it."""

    text: str
    type: ClassVar[str] = "chat"


@dataclass(frozen=True, slots=True)
class Interrupt:
    """Stop speaking now."""

    type: ClassVar[str] = "interrupt"


@dataclass(frozen=True, slots=True)
class Clapper:
    """An A/V sync test: ``count`` beeps, each with a white video frame."""

    count: int = DEFAULT_CLAPPER_COUNT
    type: ClassVar[str] = "clapper"


@dataclass(frozen=True, slots=True)
class Refused:
    """A message that was not accepted: ``message`` says why, ``field`` names the culprit."""

    message: str
    field: str | None = None


Control = Say | Chat | Interrupt | Clapper


def _text(msg: dict[str, Any], kind: str, limit: int) -> str | Refused:
    text = msg.get("text")
    if not isinstance(text, str):
        return Refused(f"{kind} needs a non-empty 'text' string", "text")
    if len(text) > limit:
        return Refused(f"{kind} text is over {limit} characters", "text")
    text = clean_text(text)
    if not text:
        return Refused(f"{kind} needs a non-empty 'text' string", "text")
    if not has_speakable(text):
        return Refused(f"{kind} text has nothing to speak (no letter or digit)", "text")
    return text


def parse_control(raw: object, *, max_json_depth: int, max_chat_chars: int) -> Control | Refused:
    """One data-channel message (bytes or text) as its model, or why it is refused."""
    if isinstance(raw, bytes | bytearray):
        data: bytes | str = bytes(raw)
    else:
        data = raw if isinstance(raw, str) else str(raw)
    try:
        msg = loads_json(data, max_depth=max_json_depth)
    except JsonRejected as exc:
        return Refused(f"control messages must be JSON objects ({exc})")
    if not isinstance(msg, dict):
        return Refused("control messages must be JSON objects")
    kind = msg.get("type")
    if kind in ("say", "chat"):
        text = _text(msg, kind, MAX_SAY_CHARS if kind == "say" else max_chat_chars)
        if isinstance(text, Refused):
            return text
        return Say(text) if kind == "say" else Chat(text)
    if kind == "interrupt":
        return Interrupt()
    if kind == "clapper":
        count = msg.get("count", DEFAULT_CLAPPER_COUNT)
        if not isinstance(count, int) or isinstance(count, bool) or not (
            1 <= count <= MAX_CLAPPER_COUNT
        ):
            return Refused(f"clapper 'count' must be an integer 1..{MAX_CLAPPER_COUNT}", "count")
        return Clapper(count)
    if isinstance(kind, str):
        return Refused(f"unknown message type {short(kind)!r}", "type")
    return Refused("control messages need a 'type' string", "type")


# --- events out --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    type: ClassVar[str]

    def to_wire(self) -> dict[str, object]:
        out: dict[str, object] = {"type": self.type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """The first event on the channel: the call's id and its media format."""

    session_id: str
    avatar_id: str
    fps: int
    width: int
    height: int
    sample_rate: int
    type: ClassVar[str] = "hello"


@dataclass(frozen=True, slots=True)
class State(Event):
    """What the avatar does now: ``listening``, ``thinking`` or ``speaking``; ``user`` is
    ``speaking`` while the person's voice is heard."""

    state: Literal["listening", "thinking", "speaking"]
    user: Literal["speaking"] | None = None
    type: ClassVar[str] = "state"


@dataclass(frozen=True, slots=True)
class Transcript(Event):
    """A final line of the conversation: the user's (voice or chat) or the assistant's (sent
    when its audio starts playing). ``turn``: the turn's number."""

    role: Literal["user", "assistant"]
    text: str
    final: bool = True
    source: Literal["voice", "chat"] | None = None
    language: str | None = None
    turn: int | None = None
    type: ClassVar[str] = "transcript"


@dataclass(frozen=True, slots=True)
class Metrics(Event):
    """One turn's stage times in ms (``stt_ms``, ``llm_first_token_ms``, ...), sent when its
    first audio plays."""

    source: str
    values: dict[str, float] = field(default_factory=dict)
    turn: int | None = None
    # what ended the person's turn: short, long, fixed or model (pipeline.turns); its wait
    # is ``end_wait_ms`` among the values
    end_rule: str | None = None
    type: ClassVar[str] = "metrics"

    def to_wire(self) -> dict[str, object]:
        out: dict[str, object] = {"type": self.type, "source": self.source, **self.values}
        if self.turn is not None:
            out["turn"] = self.turn
        if self.end_rule is not None:
            out["end_rule"] = self.end_rule
        return out


@dataclass(frozen=True, slots=True)
class Error(Event):
    """Something failed or was refused. ``stage``: where (``control``, ``stt``, ``llm``,
    ``tts``, ``lipsync``); ``fatal``: the call cannot go on as it was; ``field``: the field of
    a refused control message."""

    message: str
    fatal: bool = False
    stage: str | None = None
    field: str | None = None
    type: ClassVar[str] = "error"


@dataclass(frozen=True, slots=True)
class LipSync(Event):
    """Who draws the mouth changed: ``degraded`` true when the configured engine kept missing
    its frame deadlines (``reason`` ``deadlines_missed``) or could not run at all
    (``engine_unavailable``: its inference pool is away) and ``engine`` (the fallback) draws
    the rest of the utterance; false when the configured engine is back."""

    engine: str
    degraded: bool
    reason: str
    type: ClassVar[str] = "lipsync"


@dataclass(frozen=True, slots=True)
class Closing(Event):
    """The call is about to end, and why (``idle``, ``call_limit``, ``draining``, ...)."""

    reason: str
    detail: str
    type: ClassVar[str] = "closing"


def with_turn(event: Event, number: int) -> Event:
    """``event`` labelled with its turn's number (transcripts and metrics carry one)."""
    if isinstance(event, Transcript | Metrics):
        return dataclasses.replace(event, turn=number)
    return event
