"""Log lines: JSON objects (or readable text) carrying the session id inside a session's
context, exceptions, extras, redacted secrets, and a configuration that can be applied twice."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import re

import pytest

from config import load_settings
from rtc_server.logs import NOISY_LOGGERS, REDACTED, bind_session, configure_logging

SECRETS = {
    "api key": "adm-key-5f2c9a7e1b",
    "second api key": "adm-key-second-0042",
    "offer token": "offer-tok-88d1e6",
    "llm key": "sk-live-b7c1d2e3f4",
    "turn credential": "turn-pass-314159",
    "turn secret": "coturn-shared-271828",
}


def make_settings(log_format: str = "json", log_level: str = "info", **extra):
    overrides = {
        "server.log_format": log_format,
        "server.log_level": log_level,
        "access.api_keys": [SECRETS["api key"], SECRETS["second api key"]],
        "access.offer_token": SECRETS["offer token"],
        "llm.api_key": SECRETS["llm key"],
        "webrtc.ice_servers": [{"urls": ["turn:turn.example.org:3478"], "username": "avatar",
                                "credential": SECRETS["turn credential"]}],
        "webrtc.turn_secret": SECRETS["turn secret"],
    }
    overrides.update(extra)
    return load_settings(env={}, overrides=overrides)


@pytest.fixture
def restore_logging():
    """Leave the root logger and the noisy libraries as the test found them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
        h.close()
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)


def configure(log_format="json", **kwargs):
    stream = io.StringIO()
    configure_logging(make_settings(log_format, **kwargs), stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in lines(stream) if line.startswith("{")]


async def test_json_lines_carry_the_session_id_inside_a_session_task_only(restore_logging):
    stream = configure("json")
    log = logging.getLogger("tests.logs")
    session_id = "0123456789abcdef0123456789abcdef"

    async def session_work() -> None:
        log.info("inside %s", "the session")

    async def handle_offer() -> None:  # as rtc_server.app does: bind, then create tasks
        bind_session(session_id)
        await asyncio.get_running_loop().create_task(session_work())

    log.info("before")
    await asyncio.create_task(handle_offer())
    log.warning("after")
    out = records(stream)
    assert [r["message"] for r in out] == ["before", "inside the session", "after"]
    before, inside, after = out
    assert "session_id" not in before and "session_id" not in after
    assert inside["session_id"] == session_id
    assert inside["level"] == "INFO" and inside["logger"] == "tests.logs"
    assert after["level"] == "WARNING"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", inside["ts"]), inside["ts"]
    assert "exception" not in inside


def test_json_exception_and_extras(restore_logging):
    stream = configure("json")
    log = logging.getLogger("tests.logs")
    try:
        raise ValueError("bad value 42")
    except ValueError:
        log.exception("it failed", extra={"frames": 12, "stage": "tts", "obj": object()})
    (rec,) = records(stream)
    assert rec["message"] == "it failed" and rec["level"] == "ERROR"
    assert "Traceback" in rec["exception"] and "ValueError: bad value 42" in rec["exception"]
    assert rec["frames"] == 12 and rec["stage"] == "tts"
    assert "obj" not in rec  # not JSON-able: left out, the line still parses


def test_secrets_are_redacted_from_messages_exceptions_and_extras(restore_logging):
    stream = configure("json")
    log = logging.getLogger("tests.logs")
    for name, secret in SECRETS.items():
        log.info("the %s is %s", name, secret)
    log.warning("GET /?token=%s HTTP/1.1", SECRETS["offer token"])
    try:
        raise RuntimeError(f"401 from the LLM with key {SECRETS['llm key']}")
    except RuntimeError:
        log.exception("reply failed", extra={
            "header": f"Bearer {SECRETS['api key']}",
            "request_header": {"User-Agent": f"bot {SECRETS['turn secret']}", "n": 1},
        })
    text = stream.getvalue()
    for secret in SECRETS.values():
        assert secret not in text
    out = records(stream)
    assert out[0]["message"] == f"the api key is {REDACTED}"
    assert out[len(SECRETS)]["message"] == f"GET /?token={REDACTED} HTTP/1.1"
    last = out[-1]
    assert f"with key {REDACTED}" in last["exception"] and last["header"] == f"Bearer {REDACTED}"
    assert last["request_header"] == {"User-Agent": f"bot {REDACTED}", "n": 1}


def test_text_format_is_one_readable_line_with_the_session(restore_logging):
    stream = configure("text")
    log = logging.getLogger("tests.text")
    log.info("plain line")
    session_id = "fedcba9876543210fedcba9876543210"

    def in_session() -> None:
        bind_session(session_id)
        log.info("token %s in a session", SECRETS["offer token"])

    contextvars.copy_context().run(in_session)  # the binding stays in that context
    try:
        raise KeyError("k")
    except KeyError:
        log.error("oops", exc_info=True)
    first, second, third, *trace = lines(stream)
    assert re.fullmatch(r"\S+Z INFO tests\.text: plain line", first), first
    assert second.endswith(f"tests.text: token {REDACTED} in a session [session {session_id[:8]}]")
    assert third.endswith("ERROR tests.text: oops") and "session" not in third
    assert trace[0].startswith("Traceback") and trace[-1] == "KeyError: 'k'"
    assert not any(line.startswith("{") for line in lines(stream))


def test_configuring_twice_keeps_one_handler_and_quiets_noisy_libraries(restore_logging):
    root = logging.getLogger()
    before = len(root.handlers)
    configure("json")
    stream = configure("json")
    assert len(root.handlers) == before + 1
    logging.getLogger("tests.logs").info("once")
    assert [r["message"] for r in records(stream)] == ["once"]
    assert root.level == logging.INFO
    for name in NOISY_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING
    logging.getLogger("aioice.ice").info("Connection(0) Check CandidatePair ... State.SUCCEEDED")
    assert len(records(stream)) == 1  # the ICE chatter is not logged at INFO
    configure("text", log_level="debug")
    assert len(root.handlers) == before + 1 and root.level == logging.DEBUG
    assert logging.getLogger("aiortc").getEffectiveLevel() == logging.DEBUG


def test_a_record_with_bad_arguments_does_not_break_the_caller(restore_logging, capsys):
    stream = io.StringIO()
    handler = configure_logging(make_settings("json"), stream=stream)
    log = logging.getLogger("tests.logs")
    bad = log.makeRecord(log.name, logging.INFO, __file__, 1, "two args %s %s", ("one",), None)
    handler.handle(bad)  # the redaction filter passes it on; logging reports the error
    log.info("next")
    assert [r["message"] for r in records(stream)] == ["next"]
    assert "two args" in capsys.readouterr().err
