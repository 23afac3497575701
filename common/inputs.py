"""Untrusted input, made safe before anything else sees it: JSON bodies and messages, numbers
and free text.

- :func:`loads_json` decodes a JSON document whose brackets nest at most ``max_depth`` deep
  (counted before decoding, so a ``[[[[...`` bomb never reaches the recursive decoder) and
  refuses ``NaN``, ``Infinity`` and numbers a float cannot hold (``1e400``). Every refusal is
  a :class:`JsonRejected` (a ``ValueError``) with a short reason.
- :func:`as_finite` turns a JSON number into a float or says which field is wrong (an integer
  of 400 digits is a refusal, not an ``OverflowError``).
- :func:`clean_text` removes what must never reach speech synthesis, a log line or a file
  name: C0/C1 control characters (tabs and line breaks become spaces), lone surrogates and
  the invisible bidirectional overrides. Letters of every script, combining marks, emoji and
  the ordinary right-to-left marks stay.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "JsonRejected",
    "as_finite",
    "clean_text",
    "has_speakable",
    "json_depth",
    "loads_json",
    "short",
]

DEFAULT_MAX_DEPTH = 32
# |x| above this has no exact float; every field the server reads is far smaller
MAX_EXACT_INT = 2**53

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]")
_OPEN = frozenset(b"[{")
# bidirectional embeddings/overrides/isolates: invisible, and they reorder what a reader sees
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_SPACES = frozenset("\t\n\r\x0b\x0c\x85\u2028\u2029")


class JsonRejected(ValueError):
    """The document is not JSON the server accepts; ``str()`` says why in a few words."""


def json_depth(raw: bytes | str) -> int:
    """How deep brackets nest in ``raw`` (JSON text), string contents ignored. Linear time, no
    recursion: strings are cut out by a regular expression and the brackets left are summed."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where(np.isin(codes, list(_OPEN)), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def _no_constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRejected(f"the number {short(text, 24)} is out of range")
    return value


def loads_json(raw: bytes | str, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """``json.loads`` for untrusted input; :class:`JsonRejected` for anything refused."""
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonRejected(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    else:
        text = raw
    depth = json_depth(text)
    if depth > max_depth:
        raise JsonRejected(f"nested {depth} levels deep; at most {max_depth} are accepted")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except JsonRejected:
        raise
    except RecursionError:  # cannot happen under the depth bound; kept as a last guard
        raise JsonRejected("nested too deep") from None
    except ValueError as exc:  # JSONDecodeError, and int() past sys.int_info's digit limit
        raise JsonRejected(short(str(exc), 120)) from None


def as_finite(name: str, value: object) -> float:
    """``value`` (a JSON number) as a finite float; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"field {name!r} must be a number")
    if isinstance(value, int) and abs(value) > MAX_EXACT_INT:
        raise ValueError(f"field {name!r} is out of range")
    if not math.isfinite(value):
        raise ValueError(f"field {name!r} must be a finite number")
    return float(value)


def clean_text(text: str) -> str:
    """``text`` without control characters, lone surrogates or bidi overrides (line breaks
    and tabs become spaces), stripped. Everything printable is kept as it was."""
    if text.isprintable() and not _BIDI_CONTROLS.intersection(text):
        return text.strip()
    out = []
    for ch in text:
        if ch in _SPACES:
            out.append(" ")
            continue
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs") or ch in _BIDI_CONTROLS:
            continue
        out.append(ch)
    return "".join(out).strip()


def has_speakable(text: str) -> bool:
    """Whether ``text`` has a letter or a digit (of any script): something a voice can say."""
    return any(ch.isalnum() for ch in text)


def short(text: object, limit: int = 40) -> str:
    """``repr``-safe prefix of ``text`` for an error message (never the whole of a huge input)."""
    s = str(text)
    return s if len(s) <= limit else s[:limit] + "…"
