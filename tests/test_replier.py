"""The replier: OpenAI-compatible streaming with our retry policy (against a scripted local
server), and the embedded offline persona."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from datetime import datetime
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from common.errors import PipelineError
from pipeline.replier import EmbeddedReplier, OpenAIReplier, Replier, ReplyError, trim_history
from tests.fakes.openai_server import FakeOpenAIState, start_fake_openai

SECRET = "sk-test-5ecret-do-not-log"
SYSTEM = "You are a friendly avatar. Answer in one or two short sentences."
StartFake = Callable[..., Awaitable[tuple[str, FakeOpenAIState]]]


class FixedRandom(random.Random):
    """``random()`` always returns ``value``: the jitter factor, pinned."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


class SleepRecorder:
    """Stands in for asyncio.sleep: records the backoff delays, waits for nothing."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)


@pytest.fixture
async def fake_openai() -> AsyncIterator[StartFake]:
    closers = []

    async def start(script: list[Any], **kwargs: Any) -> tuple[str, FakeOpenAIState]:
        url, state, close = await start_fake_openai(script, **kwargs)
        closers.append(close)
        return url, state

    yield start
    for close in closers:
        await close()


@pytest.fixture
async def make_replier() -> AsyncIterator[Callable[..., OpenAIReplier]]:
    made: list[OpenAIReplier] = []

    def make(url: str, **kwargs: Any) -> OpenAIReplier:
        options: dict[str, Any] = {
            "base_url": url,
            "api_key": SECRET,
            "model": "test-model",
            "system_prompt": SYSTEM,
            "sleep": SleepRecorder(),
            "rng": random.Random(7),
        }
        options.update(kwargs)
        replier = OpenAIReplier(**options)
        made.append(replier)
        return replier

    yield make
    for replier in made:
        await replier.aclose()


async def collect(replier: Replier, text: str = "hi", **kwargs: Any) -> list[str]:
    history = kwargs.pop("history", [])
    return [delta async for delta in replier.reply(history, text, **kwargs)]


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def conversation(turns: int) -> list[dict[str, str]]:
    history = []
    for i in range(1, turns + 1):
        history.append({"role": "user", "content": f"question {i}"})
        history.append({"role": "assistant", "content": f"answer {i}"})
    return history


# --- the interface, for both implementations -------------------------------------------


@pytest.mark.parametrize("kind", ["openai", "embedded"])
async def test_replier_contract(kind: str, fake_openai: StartFake, make_replier: Any) -> None:
    if kind == "openai":
        url, _ = await fake_openai([("stream", ["Hello", " there", "."])])
        replier: Replier = make_replier(url)
    else:
        replier = EmbeddedReplier()
    deltas = await collect(replier, "hello")
    assert deltas and all(isinstance(d, str) for d in deltas)
    assert "".join(deltas).strip()
    assert isinstance(replier.name, str)
    assert replier.info()["replier"] == replier.name


# --- OpenAIReplier ---------------------------------------------------------------------


async def test_streams_deltas_in_order(fake_openai: StartFake, make_replier: Any) -> None:
    url, state = await fake_openai([("stream", ["Hello", " there", ",", " friend", "."])])
    replier = make_replier(url)
    deltas = await collect(replier)
    assert deltas == ["Hello", " there", ",", " friend", "."]
    assert "".join(deltas) == "Hello there, friend."
    assert state.calls == 1
    assert replier.consecutive_failures == 0


async def test_request_carries_prompt_history_model_and_key(
    fake_openai: StartFake, make_replier: Any
) -> None:
    url, state = await fake_openai([("stream", ["Fine."])])
    replier = make_replier(url, history_turns=2, temperature=0.3, max_tokens=120)
    await collect(replier, "new question", history=conversation(5))
    (request,) = state.requests
    assert request.path == "/v1/chat/completions"
    assert request.model == "test-model"
    assert request.stream is True
    assert request.authorization == f"Bearer {SECRET}"
    assert request.body["temperature"] == 0.3
    assert request.body["max_tokens"] == 120
    assert request.messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "question 4"},
        {"role": "assistant", "content": "answer 4"},
        {"role": "user", "content": "question 5"},
        {"role": "assistant", "content": "answer 5"},
        {"role": "user", "content": "new question"},
    ]


async def test_language_other_than_english_is_asked_for(
    fake_openai: StartFake, make_replier: Any
) -> None:
    url, state = await fake_openai([("stream", ["سلام"])])
    await collect(make_replier(url), "سلام", language="fa")
    system = state.requests[0].messages[0]
    assert system["role"] == "system"
    assert system["content"].startswith(SYSTEM)
    assert "Persian" in system["content"]


async def test_without_key_sends_a_placeholder(fake_openai: StartFake, make_replier: Any) -> None:
    url, state = await fake_openai([("stream", ["Hi."])])
    replier = make_replier(url, api_key=None)
    await collect(replier)
    assert state.requests[0].authorization == "Bearer not-needed"
    assert replier.info()["api_key_set"] is False


def test_trim_history() -> None:
    history = conversation(3)
    assert trim_history(history, 0) == []
    assert trim_history(history, 1) == history[-2:]
    assert trim_history(history, 8) == history
    # An unanswered turn (e.g. a barge-in) counts as a turn; other roles are left out.
    ragged = [{"role": "system", "content": "x"}, *history, {"role": "user", "content": "u"}]
    assert trim_history(ragged, 2) == [*history[-2:], {"role": "user", "content": "u"}]


async def test_429_then_500_then_success(fake_openai: StartFake, make_replier: Any) -> None:
    url, state = await fake_openai(
        [("error", 429, {"Retry-After": "0"}), ("error", 500), ("stream", ["Back", "."])]
    )
    replier = make_replier(url, rng=random.Random(7), backoff_base_s=0.5)
    assert "".join(await collect(replier)) == "Back."
    assert state.calls == 3
    # Retry 0 waits what Retry-After says; retry 1 has no header: full jitter on 0.5 * 2**1.
    expected_jitter = random.Random(7).random()
    assert replier._sleep.delays == [0.0, pytest.approx(1.0 * expected_jitter)]
    assert replier.consecutive_failures == 0


async def test_backoff_grows_exponentially_up_to_the_cap(
    fake_openai: StartFake, make_replier: Any
) -> None:
    url, state = await fake_openai([("error", 503)] * 6)
    replier = make_replier(
        url, max_retries=5, backoff_base_s=0.5, backoff_max_s=3.0, rng=FixedRandom(0.5)
    )
    with pytest.raises(ReplyError) as caught:
        await collect(replier)
    assert state.calls == 6
    assert replier._sleep.delays == [0.25, 0.5, 1.0, 1.5, 1.5]
    assert caught.value.retryable is True
    assert caught.value.status == 503


async def test_backoff_jitter_stays_within_bounds(
    fake_openai: StartFake, make_replier: Any
) -> None:
    url, _ = await fake_openai([("error", 502)] * 4)
    replier = make_replier(url, max_retries=3, rng=random.Random(1))
    with pytest.raises(ReplyError):
        await collect(replier)
    delays = replier._sleep.delays
    assert len(delays) == 3
    for attempt, delay in enumerate(delays):
        assert 0.0 <= delay <= min(8.0, 0.5 * 2**attempt)


async def test_retry_after_is_capped_at_backoff_max(
    fake_openai: StartFake, make_replier: Any
) -> None:
    url, _ = await fake_openai(
        [
            ("error", 429, {"Retry-After": "120"}),
            ("error", 429, {"retry-after-ms": "250"}),
            ("error", 429, {"Retry-After": "1.5"}),
            ("stream", ["ok"]),
        ]
    )
    replier = make_replier(url, backoff_max_s=4.0)
    await collect(replier)
    assert replier._sleep.delays == [4.0, 0.25, 1.5]


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_client_errors_are_not_retried(
    status: int, fake_openai: StartFake, make_replier: Any
) -> None:
    url, state = await fake_openai([("error", status, f"bad request message {status}")])
    replier = make_replier(url)
    with pytest.raises(ReplyError) as caught:
        await collect(replier)
    error = caught.value
    assert isinstance(error, PipelineError)
    assert error.retryable is False
    assert error.status == status
    assert f"bad request message {status}" in error.detail
    assert state.calls == 1
    assert replier._sleep.delays == []


async def test_no_first_token_in_time_is_retried_then_fails(
    fake_openai: StartFake, make_replier: Any
) -> None:
    url, state = await fake_openai([("hang", 30), ("stream", ["late"], 0.0, 30.0)])
    replier = make_replier(url, first_token_timeout_s=0.2, max_retries=1)
    with pytest.raises(ReplyError) as caught:
        await collect(replier)
    assert caught.value.retryable is True
    assert caught.value.status is None
    assert "first token" in caught.value.detail
    assert state.calls == 2
    assert len(replier._sleep.delays) == 1
    # Both requests were abandoned: the server saw the client go.
    await asyncio.wait_for(_disconnects(state, 2), 5)


async def test_first_token_timeout_then_success(fake_openai: StartFake, make_replier: Any) -> None:
    url, state = await fake_openai([("hang", 30), ("stream", ["On", " time."])])
    replier = make_replier(url, first_token_timeout_s=0.2)
    assert "".join(await collect(replier)) == "On time."
    assert state.calls == 2


async def test_connection_refused_is_retryable(make_replier: Any) -> None:
    replier = make_replier(f"http://127.0.0.1:{closed_port()}/v1", max_retries=2)
    with pytest.raises(ReplyError) as caught:
        await collect(replier)
    assert caught.value.retryable is True
    assert caught.value.status is None
    assert len(replier._sleep.delays) == 2


async def test_failure_after_text_ends_the_reply_without_retry(
    fake_openai: StartFake, make_replier: Any
) -> None:
    url, state = await fake_openai([("drop", ["Hello", " wor"]), ("stream", ["never"])])
    replier = make_replier(url)
    received: list[str] = []
    with pytest.raises(ReplyError):
        async for delta in replier.reply([], "hi"):
            received.append(delta)
    assert received == ["Hello", " wor"]
    assert state.calls == 1
    assert replier._sleep.delays == []
    assert replier.consecutive_failures == 1


async def test_error_event_in_stream_is_not_retried(
    fake_openai: StartFake, make_replier: Any
) -> None:
    url, state = await fake_openai([("stream_error", [], "model overloaded")])
    replier = make_replier(url)
    with pytest.raises(ReplyError) as caught:
        await collect(replier)
    assert "model overloaded" in caught.value.detail
    assert state.calls == 1


async def test_consecutive_failures_and_fatal(fake_openai: StartFake, make_replier: Any) -> None:
    url, _ = await fake_openai([("error", 400), ("error", 500), ("stream", ["ok"]), ("error", 401)])
    replier = make_replier(url, max_retries=0, max_consecutive_failures=2)
    for expected in (1, 2):
        with pytest.raises(ReplyError):
            await collect(replier)
        assert replier.consecutive_failures == expected
    assert replier.fatal
    assert replier.info()["fatal"] is True
    await collect(replier)
    assert replier.consecutive_failures == 0
    assert not replier.fatal
    with pytest.raises(ReplyError):
        await collect(replier)
    assert replier.consecutive_failures == 1
    assert not replier.fatal


async def test_cancelling_mid_stream_closes_the_server_stream(
    fake_openai: StartFake, make_replier: Any
) -> None:
    url, state = await fake_openai([("stream", ["Hello", " there", " again"], 30.0)])
    replier = make_replier(url)
    first = asyncio.Event()
    received: list[str] = []

    async def speak() -> None:
        async for delta in replier.reply([], "hi"):
            received.append(delta)
            first.set()

    task = asyncio.create_task(speak())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(state.disconnected.wait(), 2)
    assert received == ["Hello"]
    assert state.completed == 0
    # Barge-in is neither a success nor a failure.
    assert replier.consecutive_failures == 0


async def test_closing_the_iterator_closes_the_server_stream(
    fake_openai: StartFake, make_replier: Any
) -> None:
    url, state = await fake_openai([("stream", ["Hello", " there"], 30.0)])
    replier = make_replier(url)
    async with aclosing(replier.reply([], "hi")) as deltas:
        async for delta in deltas:
            assert delta == "Hello"
            break
    await asyncio.wait_for(state.disconnected.wait(), 2)
    assert state.completed == 0


async def test_api_key_never_shown(
    fake_openai: StartFake, make_replier: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # A careless server echoes the key back in its error message.
    url, state = await fake_openai(
        [("error", 500), ("error", 401, f"Incorrect API key provided: {SECRET}")]
    )
    replier = make_replier(url)
    with pytest.raises(ReplyError) as caught:
        await collect(replier)
    assert state.requests[0].authorization == f"Bearer {SECRET}"
    assert caught.value.status == 401
    assert "retrying" in caplog.text
    assert "Incorrect API key provided: ***" in caught.value.detail
    for shown in (repr(replier), str(replier.info()), str(caught.value), caplog.text):
        assert SECRET not in shown


async def test_credentials_in_the_url_are_not_shown(make_replier: Any) -> None:
    replier = make_replier("https://alice:hunter2@llm.example:8443/v1?key=abc#frag")
    assert replier.info()["base_url"] == "https://llm.example:8443/v1"
    for shown in (repr(replier), str(replier.info())):
        assert "hunter2" not in shown
        assert "abc" not in shown
        assert SECRET not in shown


async def _disconnects(state: FakeOpenAIState, n: int) -> None:
    while state.disconnects < n:
        state.disconnected.clear()
        await state.disconnected.wait()


# --- EmbeddedReplier -------------------------------------------------------------------

NOW = datetime(2024, 5, 17, 14, 5)


async def embedded(text: str, *, language: str = "en", history: Any = ()) -> str:
    replier = EmbeddedReplier(now=lambda: NOW)
    deltas = [d async for d in replier.reply(list(history), text, language=language)]
    return "".join(deltas)


async def test_embedded_streams_word_by_word() -> None:
    replier = EmbeddedReplier()
    deltas = await collect(replier, "what can you do?")
    assert len(deltas) > 5
    assert deltas[0] and not deltas[0].startswith(" ")
    assert all(d.startswith(" ") for d in deltas[1:])
    assert 1 <= sum("".join(deltas).count(p) for p in ".!?") <= 3


@pytest.mark.parametrize("text", ["Hello!", "hi there", "Good morning"])
async def test_embedded_greets(text: str) -> None:
    assert (await embedded(text)).startswith("Hello!")


@pytest.mark.parametrize("text", ["What's your name?", "who are you", "What is your name"])
async def test_embedded_says_who_it_is(text: str) -> None:
    answer = await embedded(text)
    assert "avatar of this server" in answer
    assert "offline" in answer


async def test_embedded_greeting_and_question_together() -> None:
    answer = await embedded("Hi, what is your name?")
    assert answer.startswith("Hello!")
    assert "avatar" in answer


async def test_embedded_time_and_date() -> None:
    assert await embedded("What time is it?") == "It's 14:05."
    assert await embedded("what's the date today") == "Today is Friday, May 17, 2024."


@pytest.mark.parametrize(
    ("text", "result"),
    [
        ("What is 12 times 7?", "12 times 7 is 84."),
        ("what's twelve times seven", "12 times 7 is 84."),
        ("calculate 100 divided by 8", "100 divided by 8 is 12.5."),
        ("2+2", "2 plus 2 is 4."),
        ("what is twenty one minus 30", "21 minus 30 is -9."),
        ("what is 3 divided by 0", "I can't divide by zero."),
    ],
)
async def test_embedded_arithmetic(text: str, result: str) -> None:
    assert await embedded(text) == result


async def test_embedded_how_thanks_bye() -> None:
    assert "doing well" in await embedded("How are you?")
    assert "welcome" in await embedded("thank you")
    assert "Goodbye" in await embedded("ok bye")


async def test_embedded_remembers_a_name_from_history() -> None:
    assert await embedded("My name is Sara") == "Nice to meet you, Sara!"
    history = [
        {"role": "user", "content": "my name is Sara"},
        {"role": "assistant", "content": "Nice to meet you, Sara!"},
    ]
    assert await embedded("What's my name?", history=history) == "Your name is Sara."


async def test_embedded_reflects_unknown_input() -> None:
    text = "I have two purple elephants at home"
    answer = await embedded(text)
    assert "two purple elephants at home" in answer
    assert answer == await embedded(text)  # deterministic
    variants = {await embedded(f"I like the colour number {i}") for i in range(12)}
    assert len({v.split(":")[0] for v in variants}) > 1  # a few templates in use


async def test_embedded_numbers_in_a_sentence_are_not_sums() -> None:
    answer = await embedded("I have 2 cats and 3 dogs, and 555-1234 is my number")
    assert "You said" in answer or "heard" in answer


async def test_embedded_answers_in_persian() -> None:
    assert (await embedded("سلام", language="fa")).startswith("سلام")
    assert "آواتار" in await embedded("اسمت چیه؟", language="fa")
    assert await embedded("ساعت چنده؟", language="fa") == "ساعت ۱۴:۰۵ است."
    assert "۸۴" in await embedded("۱۲ ضربدر ۷ چند می‌شود؟", language="fa")
    assert "خواهش" in await embedded("ممنون", language="fa")
    reflected = await embedded("من امروز به پارک رفتم", language="fa")
    assert "من امروز به پارک رفتم" in reflected
    assert "گفتید" in reflected


async def test_embedded_never_touches_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the embedded replier opened a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", refuse)
    replier = EmbeddedReplier()
    for text in ("hello", "what time is it", "what is 6 times 7", "tell me a story"):
        assert "".join(await collect(replier, text))
    assert "".join(await collect(replier, "سلام", language="fa"))
    assert replier.info() == {"replier": "embedded", "network": False}


# --- the fake server itself (other end-to-end tests rely on it) ------------------------


async def test_fake_server_modes(fake_openai: StartFake) -> None:
    def by_model(request: Any) -> tuple[Any, ...]:
        return ("stream", [f"model {request.model}"])

    url, state = await fake_openai(
        [("stream", ["Whole", " answer."]), by_model], default=("echo",), models=["m1"]
    )
    user: list[ChatCompletionMessageParam] = [{"role": "user", "content": "ping pong"}]
    client = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0)
    try:
        whole = await client.chat.completions.create(model="m", messages=user)
        assert whole.choices[0].message.content == "Whole answer."
        called = await client.chat.completions.create(model="m2", messages=user)
        assert called.choices[0].message.content == "model m2"
        stream = await client.chat.completions.create(model="m", messages=user, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "You said: ping pong"
        assert [m.id async for m in client.models.list()] == ["m1"]
    finally:
        await client.close()
    assert [r.stream for r in state.requests] == [False, False, True]
    assert state.completed == 3
    assert state.disconnects == 0

    url, state = await fake_openai([])
    client = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError, match="script exhausted"):
            await client.chat.completions.create(model="m", messages=user)
    finally:
        await client.close()


def test_the_llm_section_builds_the_same_replier_as_its_arguments():
    from config import load_settings

    llm = load_settings(env={}, overrides={
        "llm.base_url": "http://127.0.0.1:9/v1", "llm.model": "m1", "llm.history_turns": 3,
        "llm.max_retries": 1, "llm.temperature": 0.2,
    }).llm
    r = OpenAIReplier.from_settings(llm)
    assert (r.history_turns, r.info()["model"]) == (3, "m1")
    assert r.info()["base_url"].startswith("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="base_url"):
        OpenAIReplier.from_settings(load_settings(env={}).llm)
