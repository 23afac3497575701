"""What the avatar says back: the ``Replier`` interface, an OpenAI-compatible chat client
with our own retry policy, and the embedded offline persona."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import re
import time
import unicodedata
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import urlsplit, urlunsplit

import openai

from common.errors import PipelineError

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

logger = logging.getLogger(__name__)

Message = dict[str, str]
"""One conversation turn: ``{"role": "user" | "assistant", "content": text}``."""

LANGUAGE_NAMES = {
    "en": "English",
    "fa": "Persian",
    "ar": "Arabic",
    "de": "German",
    "es": "Spanish",
    "fr": "French",
    "it": "Italian",
    "ja": "Japanese",
    "pt": "Portuguese",
    "ru": "Russian",
    "tr": "Turkish",
    "zh": "Chinese",
}


class Replier(Protocol):
    name: str

    def reply(
        self, history: Sequence[Message], text: str, *, language: str = "en"
    ) -> AsyncIterator[str]:
        """Answer ``text`` (the user's new turn, in ``language``, an ISO 639-1 code) after
        ``history`` (earlier turns, oldest first), yielding text deltas as they arrive.

        Implementations are async generators. Close the iterator (``contextlib.aclosing``)
        or cancel the task consuming it to stop a reply early, e.g. on barge-in."""
        ...

    def info(self) -> dict[str, Any]:
        """What to report on /health: the implementation and its settings, never secrets."""
        ...

    async def aclose(self) -> None:
        """Release what the replier holds (an HTTP connection pool); called once, when its
        call ends."""
        ...


class ReplyError(PipelineError):
    """A reply failed. ``retryable``: the failure was transient (rate limit, server error,
    timeout, connection), so the same turn may succeed later. ``status``: the upstream
    HTTP status, None when there was no HTTP answer (timeout, connection error)."""

    code = "reply_error"

    def __init__(self, detail: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(detail)
        self.retryable = retryable
        # Unlike AvatarServerError.status (what to answer our own clients with), this is the
        # upstream's status; a reply is never an HTTP answer of ours.
        self.status = status  # type: ignore[assignment]


class OpenAIReplier:
    """Streams replies from an OpenAI-compatible ``/chat/completions`` endpoint (OpenAI,
    vLLM, llama.cpp, Ollama...).

    The client's own retries are off; this class retries transient failures (HTTP 429,
    5xx, timeouts, connection errors) with exponential backoff and full jitter, honouring
    ``Retry-After``, but only while nothing has been yielded yet. Other 4xx are final.

    history_turns: user turns (with their answers) of history sent along.
    first_token_timeout_s: the most one attempt may wait for its first text delta.
    total_timeout_s: the most one attempt may take from request to last delta.
    max_retries: retries after the first attempt (so at most ``max_retries + 1`` requests).
    backoff_base_s, backoff_max_s: retry ``k`` (from 0) waits
    ``min(backoff_max_s, backoff_base_s * 2**k) * rng.random()`` seconds, or the server's
    ``Retry-After`` capped at ``backoff_max_s``.
    max_consecutive_failures: ``fatal`` once this many replies in a row failed.
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        model: str,
        system_prompt: str,
        history_turns: int = 8,
        first_token_timeout_s: float = 10.0,
        total_timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        max_consecutive_failures: int = 3,
        temperature: float = 0.7,
        max_tokens: int = 300,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if history_turns < 0 or max_retries < 0 or max_consecutive_failures < 1:
            raise ValueError("history_turns, max_retries >= 0 and max_consecutive_failures >= 1")
        if first_token_timeout_s <= 0 or total_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        self.base_url = base_url
        self.model = model
        self.system_prompt = system_prompt
        self.history_turns = history_turns
        self.first_token_timeout_s = first_token_timeout_s
        self.total_timeout_s = total_timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_consecutive_failures = max_consecutive_failures
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.consecutive_failures = 0
        self._secret = api_key or ""
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "not-needed",
            max_retries=0,
            timeout=total_timeout_s,
        )

    @property
    def fatal(self) -> bool:
        """True once ``max_consecutive_failures`` replies in a row have failed."""
        return self.consecutive_failures >= self.max_consecutive_failures

    def __repr__(self) -> str:
        return f"OpenAIReplier(base_url={_public_url(self.base_url)!r}, model={self.model!r})"

    def info(self) -> dict[str, Any]:
        return {
            "replier": self.name,
            "network": True,
            "base_url": _public_url(self.base_url),
            "model": self.model,
            "api_key_set": bool(self._secret),
            "history_turns": self.history_turns,
            "max_retries": self.max_retries,
            "consecutive_failures": self.consecutive_failures,
            "fatal": self.fatal,
        }

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.close()

    def build_messages(
        self, history: Sequence[Message], text: str, *, language: str = "en"
    ) -> list[Message]:
        """The request's messages: the system prompt (plus, for a language other than
        English, an instruction to answer in it), the last ``history_turns`` user turns of
        ``history`` with their answers, and ``text``."""
        system = self.system_prompt
        if language != "en":
            name = LANGUAGE_NAMES.get(language, f"the language with code {language!r}")
            system = f"{system}\n\nReply in {name}.".strip()
        messages: list[Message] = [{"role": "system", "content": system}] if system else []
        messages += trim_history(history, self.history_turns)
        messages.append({"role": "user", "content": text})
        return messages

    async def reply(
        self, history: Sequence[Message], text: str, *, language: str = "en"
    ) -> AsyncIterator[str]:
        messages = self.build_messages(history, text, language=language)
        try:
            async with aclosing(self._deltas_with_retries(messages)) as deltas:
                async for delta in deltas:
                    yield delta
        except ReplyError:
            self.consecutive_failures += 1
            raise
        self.consecutive_failures = 0

    async def _deltas_with_retries(self, messages: list[Message]) -> AsyncGenerator[str, None]:
        attempt = 0
        while True:
            streamed = False
            try:
                async with aclosing(self._attempt(messages)) as deltas:
                    async for delta in deltas:
                        streamed = True
                        yield delta
                return
            except (openai.OpenAIError, TimeoutError, ValueError) as exc:
                error = self._reply_error(exc)
                if streamed or not error.retryable or attempt >= self.max_retries:
                    logger.warning(
                        "reply failed after %d attempt(s)%s: %s",
                        attempt + 1,
                        " mid-stream" if streamed else "",
                        error.detail,
                    )
                    raise error from None
                delay_s = self._backoff_s(attempt, exc)
                logger.warning(
                    "reply attempt %d of %d failed (%s); retrying in %.2f s",
                    attempt + 1,
                    self.max_retries + 1,
                    error.detail,
                    delay_s,
                )
            await self._sleep(delay_s)
            attempt += 1

    async def _attempt(self, messages: list[Message]) -> AsyncGenerator[str, None]:
        """One request, its text deltas as they arrive."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.total_timeout_s
        first_deadline = min(deadline, start + self.first_token_timeout_s)
        try:
            async with asyncio.timeout_at(first_deadline):
                stream = await self._client.chat.completions.create(
                    model=self.model,
                    messages=cast("list[ChatCompletionMessageParam]", messages),
                    stream=True,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                )
        except TimeoutError:
            raise TimeoutError(
                f"no first token within {self.first_token_timeout_s:g} s (no HTTP answer)"
            ) from None
        async with stream:
            got_text = False
            while True:
                try:
                    async with asyncio.timeout_at(deadline if got_text else first_deadline):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if got_text:
                        raise TimeoutError(
                            f"reply not finished within {self.total_timeout_s:g} s"
                        ) from None
                    raise TimeoutError(
                        f"no first token within {self.first_token_timeout_s:g} s"
                    ) from None
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    got_text = True
                    yield delta

    def _reply_error(self, exc: BaseException) -> ReplyError:
        status: int | None = None
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            retryable = status == 429 or status >= 500
            detail = f"HTTP {status}: {_server_message(exc)}"
        elif isinstance(exc, openai.APITimeoutError | TimeoutError):
            retryable = True
            detail = f"timeout: {exc}"
        elif isinstance(exc, openai.APIConnectionError):
            retryable = True
            cause = exc.__cause__
            detail = f"connection error: {cause or exc}"
        elif isinstance(exc, openai.APIError):
            retryable = False  # an error event inside the stream
            detail = f"error in stream: {exc.message}"
        else:
            retryable = False
            detail = f"bad response: {type(exc).__name__}: {exc}"
        return ReplyError(self._redact(detail), retryable=retryable, status=status)

    def _backoff_s(self, attempt: int, exc: BaseException) -> float:
        retry_after_s = _retry_after_s(exc)
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.backoff_max_s)
        return min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * self._rng.random()

    def _redact(self, text: str) -> str:
        # A misbehaving server may echo the key back in an error message.
        return text.replace(self._secret, "***") if self._secret else text


def trim_history(history: Sequence[Message], turns: int) -> list[Message]:
    """The last ``turns`` user messages of ``history`` with the assistant answers after
    them; messages with other roles are left out."""
    kept: list[Message] = []
    users = 0
    for message in reversed(history):
        role = message.get("role")
        if role not in ("user", "assistant"):
            continue
        if role == "user":
            users += 1
            if users > turns:
                break
        elif users >= turns:
            break  # an answer to a user turn that is no longer kept
        kept.append({"role": role, "content": message.get("content", "")})
    kept.reverse()
    return kept


def _server_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("error") or body.get("detail")
        if isinstance(message, dict):
            message = message.get("message")
        if isinstance(message, str) and message:
            return message[:500]
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return exc.message


def _retry_after_s(exc: BaseException) -> float | None:
    """The server's ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), in s."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                continue
            seconds = when.timestamp() - time.time()
        if math.isfinite(seconds):
            return seconds
    return None


def _public_url(url: str) -> str:
    """``url`` without user info, query or fragment (where credentials may hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# --- the embedded persona ---------------------------------------------------------------

_EN_NUMBERS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_EN_TENS = {
    word: 10 * value
    for value, word in enumerate(
        "twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2
    )
}
_EN_OPERATORS = {
    "plus": "+",
    "+": "+",
    "minus": "-",
    "-": "-",
    "times": "*",
    "x": "*",
    "*": "*",
    "×": "*",
    "multiplied by": "*",
    "divided by": "/",
    "over": "/",
    "/": "/",
    "÷": "/",
}
_EN_OPERATOR_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
_FA_OPERATORS = {
    "به علاوه": "+",
    "بعلاوه": "+",
    "به اضافه": "+",
    "باضافه": "+",
    "جمع": "+",
    "منهای": "-",
    "منها": "-",
    "ضربدر": "*",
    "ضرب در": "*",
    "ضرب": "*",
    "تقسیم بر": "/",
    "تقسیم": "/",
}
_FA_OPERATOR_WORDS = {"+": "به علاوه", "-": "منهای", "*": "ضربدر", "/": "تقسیم بر"}
_FA_DIGITS = str.maketrans("0123456789.-", "۰۱۲۳۴۵۶۷۸۹٫−")
_FA_WEEKDAYS = ("دوشنبه", "سه‌شنبه", "چهارشنبه", "پنجشنبه", "جمعه", "شنبه", "یکشنبه")
_FA_MONTHS = (
    "ژانویه",
    "فوریه",
    "مارس",
    "آوریل",
    "مه",
    "ژوئن",
    "ژوئیه",
    "اوت",
    "سپتامبر",
    "اکتبر",
    "نوامبر",
    "دسامبر",
)

_NUMBER = r"-?\d+(?:\.\d+)?"
_EN_FILLERS = frozenset(
    "what whats is how much calculate compute please equals equal to tell me can you could "
    "the answer of so ok okay um uh hey do know".split()
)
_FA_FILLERS = frozenset("چند چقدر می میشه میشود شود است هست حاصل بگو بگید لطفا لطفاً".split())


def _alternation(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_EN_ARITHMETIC = re.compile(
    rf"({_NUMBER})\s*({_alternation(list(_EN_OPERATORS))})\s*({_NUMBER})(?!\d)"
)
_FA_ARITHMETIC = re.compile(
    rf"({_NUMBER})\s*({_alternation([*_FA_OPERATORS, *_EN_OPERATORS])})\s*({_NUMBER})(?!\d)"
)

_EN_INTENTS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("my_name_is", r"\bmy name is (\w+)"),
        ("ask_my_name", r"\bwhat(?: is|s) my name\b|\bdo you (?:know|remember) my name\b"),
        (
            "name",
            r"\bwhat(?: is|s|re| are) (?:your|ur) name\b|\bwho are you\b|\byour name\b"
            r"|\bwhat are you\b",
        ),
        ("time", r"\bwhat time\b|\bthe time\b|\btime is it\b"),
        ("date", r"\bwhat day\b|\bthe date\b|\bwhats the date\b|\btoday s date\b|\bwhat date\b"),
        ("how", r"\bhow are you\b|\bhow s it going\b|\bhow are things\b|\bhow do you do\b"),
        ("abilities", r"\bwhat can you do\b|\bwhat do you do\b|\bhelp me\b|^help$"),
        ("thanks", r"\bthank(?:s| you)\b|\bcheers\b"),
        ("bye", r"\b(?:good ?bye|bye|see you|farewell|good night)\b"),
        (
            "greeting",
            r"^(?:hi|hello|hey|hiya|howdy|greetings|good (?:morning|afternoon|evening))\b",
        ),
    )
)
_FA_INTENTS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("name", r"اسمت|اسم شما|اسم تو|نام شما|نامت|کی هستی|کی هستید|تو کی|شما کی"),
        ("time", r"ساعت چند|ساعت چنده|چه ساعتی"),
        ("date", r"امروز چندم|تاریخ|چه روزی|امروز چه روز"),
        ("how", r"حالت چطور|حال شما|خوبی|چطوری|حالتون"),
        ("abilities", r"چه کار|چکار|چی کار|چه کارهایی|کمک"),
        ("thanks", r"ممنون|مرسی|متشکر|سپاس|تشکر"),
        ("bye", r"خداحافظ|خدانگهدار|بدرود"),
        ("greeting", r"^(?:سلام|درود|صبح بخیر|عصر بخیر|شب بخیر)"),
    )
)

_EN_REFLECTIONS = (
    "You said: {text}. Tell me more.",
    "I heard you say: {text}. Go on.",
    "So you said: {text}. What makes you say that?",
    "You said: {text}. How do you feel about that?",
)
_FA_REFLECTIONS = (
    "شما گفتید: {text}. بیشتر بگویید.",
    "شنیدم که گفتید: {text}. ادامه دهید.",
    "گفتید: {text}. چرا این را می‌گویید؟",
)
_EN_ANSWERS = {
    "name": "I'm the avatar of this server, running offline without a language model.",
    "how": "I'm doing well, thank you. How are you?",
    "abilities": (
        "I can chat with you, tell you the time and the date, and do simple arithmetic. "
        "Everything runs offline on this server."
    ),
    "thanks": "You're welcome!",
    "bye": "Goodbye! It was nice talking to you.",
    "greeting": "Hello! Nice to meet you. How can I help?",
    "empty": "Sorry, I didn't catch that. Could you say it again?",
    "unknown_name": "You haven't told me your name yet. What is it?",
    "divide_by_zero": "I can't divide by zero.",
}
_FA_ANSWERS = {
    "name": "من آواتار این سرور هستم و بدون مدل زبانی، به صورت آفلاین کار می‌کنم.",
    "how": "من خوبم، ممنون. شما چطورید؟",
    "abilities": (
        "من می‌توانم با شما گفتگو کنم، ساعت و تاریخ را بگویم و حساب ساده انجام دهم. "
        "همه چیز به صورت آفلاین روی این سرور اجرا می‌شود."
    ),
    "thanks": "خواهش می‌کنم!",
    "bye": "خداحافظ! از صحبت با شما خوشحال شدم.",
    "greeting": "سلام! خوشحالم که با شما صحبت می‌کنم. چطور می‌توانم کمک کنم؟",
    "empty": "ببخشید، متوجه نشدم. لطفاً دوباره بگویید.",
    "divide_by_zero": "تقسیم بر صفر ممکن نیست.",
}


class EmbeddedReplier:
    """An offline, rule-based persona: no network, no model. Answers greetings, who it is,
    the time and date, how it is, what it can do, thanks and goodbyes, and simple arithmetic
    ("what is 12 times 7"); anything else it reflects back. English, and Persian for
    ``language="fa"`` (other languages get English).

    now: the local time, injectable for tests.
    """

    name = "embedded"

    def __init__(self, *, now: Callable[[], datetime] | None = None) -> None:
        self._now = now or (lambda: datetime.now().astimezone())

    def __repr__(self) -> str:
        return "EmbeddedReplier()"

    def info(self) -> dict[str, Any]:
        return {"replier": self.name, "network": False}

    async def aclose(self) -> None:
        """Nothing to release."""

    async def reply(
        self, history: Sequence[Message], text: str, *, language: str = "en"
    ) -> AsyncIterator[str]:
        answer = self.answer(history, text, language=language)
        for i, word in enumerate(answer.split(" ")):
            if i:
                await asyncio.sleep(0)
            yield word if i == 0 else f" {word}"

    def answer(self, history: Sequence[Message], text: str, *, language: str = "en") -> str:
        """The whole reply at once."""
        if language == "fa":
            return self._answer_fa(text)
        return self._answer_en(history, text)

    def _answer_en(self, history: Sequence[Message], text: str) -> str:
        said = _normalise_en(text)
        if not said:
            return _EN_ANSWERS["empty"]
        arithmetic = _arithmetic(_numbers_from_words(said), _EN_ARITHMETIC, _EN_FILLERS)
        if arithmetic:
            return _arithmetic_answer(arithmetic, fa=False)
        intents = [name for name, pattern in _EN_INTENTS if pattern.search(said)]
        if not intents:
            return _reflect(text, _EN_REFLECTIONS)
        intent = intents[0]
        now = self._now()
        if intent == "my_name_is":
            name = _EN_INTENTS[0][1].search(said)
            assert name is not None
            answer = f"Nice to meet you, {name.group(1).capitalize()}!"
        elif intent == "ask_my_name":
            known = _user_name(history)
            answer = f"Your name is {known}." if known else _EN_ANSWERS["unknown_name"]
        elif intent == "time":
            answer = f"It's {now:%H:%M}."
        elif intent == "date":
            answer = f"Today is {now:%A}, {now:%B} {now.day}, {now.year}."
        else:
            answer = _EN_ANSWERS[intent]
        if "greeting" in intents and intent != "greeting":
            answer = f"Hello! {answer}"
        return answer

    def _answer_fa(self, text: str) -> str:
        said = _normalise_fa(text)
        if not said:
            return _FA_ANSWERS["empty"]
        arithmetic = _arithmetic(said, _FA_ARITHMETIC, _FA_FILLERS)
        if arithmetic:
            return _arithmetic_answer(arithmetic, fa=True)
        intents = [name for name, pattern in _FA_INTENTS if pattern.search(said)]
        if not intents:
            return _reflect(text, _FA_REFLECTIONS)
        intent = intents[0]
        now = self._now()
        if intent == "time":
            answer = f"ساعت {f'{now:%H:%M}'.translate(_FA_DIGITS)} است."
        elif intent == "date":
            day = f"{now.day} {_FA_MONTHS[now.month - 1]} {now.year}".translate(_FA_DIGITS)
            answer = f"امروز {_FA_WEEKDAYS[now.weekday()]}، {day} است."
        else:
            answer = _FA_ANSWERS[intent]
        if "greeting" in intents and intent != "greeting":
            answer = f"سلام! {answer}"
        return answer


def _normalise_en(text: str) -> str:
    text = text.lower().replace("’", "'").replace("'", " ").replace("what s", "whats")
    text = re.sub(r"[^\w\s+\-*/×÷.]", " ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _normalise_fa(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("ي", "ی").replace("ك", "ک").replace("\u200c", " ")
    text = "".join(str(unicodedata.digit(ch)) if ch.isdigit() else ch for ch in text)
    text = text.replace("٫", ".").replace("−", "-")
    text = re.sub(r"[؟?!،,؛;:«»\"()]", " ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    return re.sub(r"\s+", " ", text).strip().lower()


def _numbers_from_words(text: str) -> str:
    """English number words (0 to 999) replaced by digits: "twenty one" -> "21"."""
    out: list[str] = []
    value: int | None = None
    for word in text.split():
        if word in _EN_NUMBERS or word in _EN_TENS:
            unit = _EN_NUMBERS.get(word, _EN_TENS.get(word, 0))
            if value is not None and value % 100 >= 20 and value % 10 == 0 and unit < 10:
                value += unit
            elif value is not None and value % 100 == 0 and value and unit < 100:
                value += unit
            else:
                if value is not None:
                    out.append(str(value))
                value = unit
        elif word == "hundred" and value is not None and value < 10:
            value *= 100
        else:
            if value is not None:
                out.append(str(value))
                value = None
            out.append(word)
    if value is not None:
        out.append(str(value))
    return " ".join(out)


def _arithmetic(
    said: str, pattern: re.Pattern[str], fillers: frozenset[str]
) -> tuple[str, ...] | None:
    """(left, operator, right) when ``said`` is a sum and nothing else but filler words."""
    found = pattern.search(said)
    if found is None:
        return None
    rest = f"{said[: found.start()]} {said[found.end() :]}".split()
    return found.groups() if all(word in fillers for word in rest) else None


def _arithmetic_answer(groups: Sequence[str], *, fa: bool) -> str:
    left, operator_word, right = groups
    operator = (_FA_OPERATORS.get(operator_word) if fa else None) or _EN_OPERATORS[operator_word]
    a, b = float(left), float(right)
    answers = _FA_ANSWERS if fa else _EN_ANSWERS
    if operator == "/" and b == 0:
        return answers["divide_by_zero"]
    result = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0.0}[operator]
    question = f"{_format_number(a)} {{}} {_format_number(b)}"
    if fa:
        q = question.translate(_FA_DIGITS).format(_FA_OPERATOR_WORDS[operator])
        return f"{q} می‌شود {_format_number(result).translate(_FA_DIGITS)}."
    return f"{question.format(_EN_OPERATOR_WORDS[operator])} is {_format_number(result)}."


def _format_number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _reflect(text: str, templates: Sequence[str]) -> str:
    words = text.strip().rstrip(".!?؟۔…").split()
    said = " ".join(words[:16]) + (" ..." if len(words) > 16 else "")
    template = templates[zlib.crc32(text.strip().encode()) % len(templates)]
    return template.format(text=said)


def _user_name(history: Sequence[Message]) -> str | None:
    pattern = _EN_INTENTS[0][1]
    for message in reversed(history):
        if message.get("role") == "user":
            found = pattern.search(_normalise_en(message.get("content", "")))
            if found:
                return found.group(1).capitalize()
    return None
