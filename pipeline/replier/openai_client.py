"""Replies streamed from an OpenAI-compatible ``/chat/completions`` endpoint, with our own
retry policy (rate limits, server errors, time-outs)."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit, urlunsplit

import openai

from pipeline.replier.base import LANGUAGE_NAMES, Message, ReplyError, trim_history

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

    from config.sections import LlmSettings

logger = logging.getLogger(__name__)


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

    @classmethod
    def from_settings(cls, llm: LlmSettings, **overrides: Any) -> OpenAIReplier:
        """The replier the ``llm`` section describes (``base_url`` must be set); keyword
        ``overrides`` replace single arguments (tests pass ``rng``, ``sleep``)."""
        if llm.base_url is None:
            raise ValueError("llm.base_url is not set: the embedded replier answers instead")
        args: dict[str, Any] = dict(
            base_url=llm.base_url, api_key=llm.api_key, model=llm.model,
            system_prompt=llm.system_prompt, history_turns=llm.history_turns,
            first_token_timeout_s=llm.first_token_timeout_s,
            total_timeout_s=llm.total_timeout_s, max_retries=llm.max_retries,
            max_consecutive_failures=llm.max_consecutive_failures,
            temperature=llm.temperature, max_tokens=llm.max_tokens,
        )
        return cls(**{**args, **overrides})

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


