"""Text cut into bounded synthesis units, whatever its punctuation, before a voice sees it.

A unit is one sentence; a sentence longer than ``max_chars`` is cut at its last clause
break (``, ; : — –`` and the like, or a single newline) that leaves a piece of at least a
quarter of the bound, else at its last space, and only a single "word" longer than the bound
is cut between characters. So no unit is longer than ``max_chars``, and the units joined
give the text back up to white space. The scan is linear in the text.
"""

from __future__ import annotations

import re

from pipeline.sentences import ABBREVIATIONS, CLOSERS, END_ABBREVIATIONS, STRONG_TERMINALS

MAX_UNIT_CHARS = 200
"""The longest unit handed to the voice: bounds one synthesis run's time and memory."""

CLAUSE_BREAKS = frozenset(",;:—–\n、，；：،؛")
"""Characters after which a long sentence is preferably cut."""

_CLOSER_CLASS = "".join(re.escape(c) for c in sorted(CLOSERS))
# a sentence end: terminals (and closers) then white space or the end; a CJK terminal; or
# a blank line
_SENTENCE_END = re.compile(
    rf"[.!?…؟۔]+[{_CLOSER_CLASS}]*(?=\s|$)|[。！？][{_CLOSER_CLASS}]*|\n[^\S\n]*\n"
)
_UNSPACED_BREAKS = frozenset("—–\n、，；：")
_CLOSERS = "".join(sorted(CLOSERS))
_TOKEN_STRIP = "*_`~([{<\"'“‘«"
_INITIALISM = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")


def speech_units(text: str, max_chars: int = MAX_UNIT_CHARS) -> list[str]:
    """``text`` as units of at most ``max_chars`` characters, stripped, in order; pieces
    without a letter or digit are joined to the unit before them when that fits."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    units: list[str] = []
    for sentence in _sentences(text):
        pieces = [sentence] if len(sentence) <= max_chars else _cut(sentence, max_chars)
        for piece in pieces:
            piece = piece.strip()
            if not piece:
                continue
            if (
                units
                and not any(ch.isalnum() for ch in piece)
                and len(units[-1]) + 1 + len(piece) <= max_chars
            ):
                units[-1] = f"{units[-1]} {piece}"
            else:
                units.append(piece)
    return units


FIRST_CLAUSE_MIN_CHARS = 48  # a first sentence shorter than this is said whole
FIRST_CLAUSE_MIN_PIECE = 14  # neither part of a split is shorter than this


def first_clause(text: str, *, min_chars: int = FIRST_CLAUSE_MIN_CHARS,
                 min_piece: int = FIRST_CLAUSE_MIN_PIECE) -> tuple[str, str]:
    """``text`` (an answer's first sentence) as (its first clause, the rest), cut after the
    first clause break followed by a space that leaves at least ``min_piece`` characters on
    each side; (``text``, "") when it is shorter than ``min_chars`` or has no such break.
    The voice then starts on the clause, while the rest is synthesised, and the pause it
    makes there is one a speaker makes anyway."""
    if len(text) < min_chars:
        return text, ""
    for i, ch in enumerate(text):
        if (ch in CLAUSE_BREAKS and ch != "\n" and i + 1 < len(text) and text[i + 1] == " "
                and i + 1 >= min_piece and len(text) - i - 2 >= min_piece):
            return text[: i + 1], text[i + 2:]
    return text, ""


def _sentences(text: str) -> list[str]:
    """``text`` cut after each sentence end; the pieces joined give ``text`` back."""
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        if _is_sentence_end(text, m.start(), m.end()):
            out.append(text[start : m.end()])
            start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out


def _is_sentence_end(text: str, at: int, end: int) -> bool:
    """Whether the match ``text[at:end]`` ends a sentence (abbreviations, initials and a
    lowercase word after a period or ellipsis do not)."""
    run = text[at:end]
    if run[0] in "\n。！？" or any(c in STRONG_TERMINALS for c in run):
        return True
    after = end
    while after < len(text) and text[after].isspace():
        after += 1
    if after < len(text) and text[after].islower():
        return False  # "approx. five", "Well... maybe"
    if run.rstrip(_CLOSERS) != ".":
        return True
    # the word before the period, looked for in a bounded window (keeps the scan linear)
    window = text[max(0, at - 40) : at]
    words = window.rsplit(maxsplit=1)
    token = words[-1].lstrip(_TOKEN_STRIP) if words else ""
    word = token.lower()
    if word in ABBREVIATIONS or (len(token) > 1 and _INITIALISM.fullmatch(token)):
        return False  # "Dr.", "e.g.", "U.S."
    if len(token) == 1 and token.isupper() and token != "I":
        return False  # an initial: "J. Smith"
    if word in END_ABBREVIATIONS:
        return after < len(text) and text[after].isupper()
    return True


def _cut(sentence: str, max_chars: int) -> list[str]:
    """A sentence longer than ``max_chars`` cut at clause breaks, else white space, else
    anywhere; every piece has at most ``max_chars`` characters."""
    pieces: list[str] = []
    n = len(sentence)
    floor = max(1, max_chars // 4)
    pos = _skip_space(sentence, 0)
    while n - pos > max_chars:
        window = sentence[pos : pos + max_chars + 1]
        cut = _last_clause_break(window, floor, max_chars)
        if cut is None:
            cut = next((i for i in range(len(window) - 1, 0, -1) if window[i].isspace()), 0)
            cut = cut or max_chars  # one "word" longer than the bound
        pieces.append(window[:cut])
        pos = _skip_space(sentence, pos + cut)
    if pos < n:
        pieces.append(sentence[pos:])
    return pieces


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _last_clause_break(window: str, floor: int, max_chars: int) -> int | None:
    """Index just past the last clause break in ``window`` that keeps the piece within
    ``floor..max_chars`` characters (closing quotes and brackets go with it); else None.
    A break needs white space after it ("1,000" and "10:30" are no breaks), except after a
    dash, a newline or a CJK mark."""
    for i in range(min(len(window), max_chars) - 1, floor - 2, -1):
        if window[i] not in CLAUSE_BREAKS:
            continue
        end = i + 1
        while end < len(window) and window[end] in CLOSERS:
            end += 1
        spaced = end >= len(window) or window[end].isspace() or window[i] in _UNSPACED_BREAKS
        if spaced and floor <= end <= max_chars:
            return end
    return None
