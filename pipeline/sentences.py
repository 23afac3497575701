"""Streaming sentence splitter: LLM text deltas in, speakable sentences out (for TTS).

A sentence ends after ``. ! ? …``, the Arabic-script question mark ``؟`` and full stop ``۔``
(followed by white space), after ``。！？`` (no space needed), and at every newline. A period
is no boundary inside a decimal (``3.14``), after a common abbreviation (``Dr.``, ``e.g.``,
``U.S.``), before a lowercase word (``approx. five``, ``Well... maybe``) or after a list
number (``1. First``). Markdown an LLM may emit (emphasis stars, headings, backticks, list
bullets, links, rules) is removed, since the sentences are read aloud.
"""

from __future__ import annotations

import re

TERMINALS = frozenset(".!?…؟۔")
"""Sentence-ending characters that need white space after them."""
STRONG_TERMINALS = frozenset("!?؟۔")
"""Terminals that end a sentence whatever follows the space."""
IMMEDIATE_TERMINALS = frozenset("。！？")
"""CJK terminals: a boundary straight away (those scripts put no space after them)."""
CLOSERS = frozenset("\"'”’)]}»›」』")
"""Closing quotes and brackets that belong to the sentence they follow."""
SOFT_BREAKS = frozenset(",;،؛")
"""Where a run-on sentence is preferably force-split (comma, semicolon; Arabic script too)."""

ABBREVIATIONS = frozenset(
    "mr mrs ms mx dr prof sr jr st mt rev gen col lt sgt capt gov sen rep hon "
    "vs e.g i.e cf viz al approx fig dept".split()
)
"""Lowercase, without the final period: never a sentence end."""
END_ABBREVIATIONS = frozenset("etc inc ltd co corp llc plc".split())
"""Lowercase, without the final period: a sentence end only before a capitalised word."""

_LIST_NUMBER = re.compile(r"\d{1,3}\.")
_INITIALISM = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")
_TOKEN_STRIP = "*_`~([{<\"'“‘«"

_FENCE_LINE = re.compile(r"^\s*(```|~~~).*$", re.MULTILINE)
_RULE_LINE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$", re.MULTILINE)
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_LINE_PREFIX = re.compile(r"^\s*(?:#{1,6}\s*|>\s*)*(?:(?:[-*+•‣◦▪]|\d{1,3}[.)])\s+)?", re.MULTILINE)
_NOISE = re.compile(r"\*+|`+|~~|(?<!\w)__|__(?!\w)|#{2,}|\|")
_SPACES = re.compile(r"\s+")


def strip_markdown(text: str) -> str:
    """``text`` with markdown markup removed and white space collapsed to single spaces."""
    text = _FENCE_LINE.sub("", text)
    text = _RULE_LINE.sub("", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _LINE_PREFIX.sub("", text)
    text = _NOISE.sub("", text)
    return _SPACES.sub(" ", text).strip()


class SentenceSplitter:
    """Splits streamed text into sentences as soon as each one is complete.

    min_chars: a sentence shorter than this (after clean-up) is merged into the next one.
    max_chars: a run-on longer than this is force-split, at the last comma or semicolon in
    its second half, else at the last space.
    """

    def __init__(self, min_chars: int = 12, max_chars: int = 240) -> None:
        if max_chars < 2 or not 0 <= min_chars <= max_chars:
            raise ValueError(f"need 0 <= min_chars <= max_chars, 2 <= max_chars: {min_chars=}")
        self.min_chars = min_chars
        self.max_chars = max_chars
        self._buf = ""
        self._short = ""

    def feed(self, delta: str) -> list[str]:
        """Add a text delta; return the sentences it completed (possibly none)."""
        self._buf += delta
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of text: return everything still held. The splitter is then empty and reusable."""
        out = self._drain(final=True)
        if self._short:
            out.append(self._short)
            self._short = ""
        return out

    def _drain(self, *, final: bool) -> list[str]:
        out: list[str] = []
        while self._buf:
            cut = self._boundary(final=final)
            if (cut is None or cut > self.max_chars) and len(self._buf) > self.max_chars:
                cut = self._forced_cut()
            elif cut is None:
                if not final:
                    break
                cut = len(self._buf)
            segment, self._buf = self._buf[:cut], self._buf[cut:].lstrip()
            out.extend(self._emit(strip_markdown(segment)))
        return out

    def _emit(self, sentence: str) -> list[str]:
        if not any(ch.isalnum() for ch in sentence):
            return []
        out: list[str] = []
        if self._short:
            # A short line without punctuation (a heading, a list label) gets a period so
            # the voice pauses after it.
            short = f"{self._short}." if self._short[-1].isalnum() else self._short
            merged = f"{short} {sentence}"
            if len(merged) <= self.max_chars:
                sentence = merged
            else:
                out.append(self._short)
            self._short = ""
        if len(sentence) < self.min_chars:
            self._short = sentence
        else:
            out.append(sentence)
        return out

    def _forced_cut(self) -> int:
        window = self._buf[: self.max_chars + 1]
        soft = max(window.rfind(ch) for ch in SOFT_BREAKS)
        if soft >= self.max_chars // 2:
            return soft + 1
        space = max(window.rfind(" "), window.rfind("\t"))
        return space if space > 0 else self.max_chars

    def _boundary(self, *, final: bool) -> int | None:
        """Index just past the first sentence end in the buffer; None when there is none
        yet (or, before ``final``, when the text so far cannot tell)."""
        buf = self._buf
        n = len(buf)
        i = 0
        while i < n:
            ch = buf[i]
            if ch == "\n":
                return i + 1
            if ch in IMMEDIATE_TERMINALS:
                return _skip(buf, i + 1, CLOSERS)
            if ch not in TERMINALS:
                i += 1
                continue
            run_end = _skip(buf, i, TERMINALS)
            end = _skip(buf, run_end, CLOSERS)
            if end == n:
                return end if final else None
            if not buf[end].isspace():
                i = end  # 3.14, example.com, "?!" runs
                continue
            run = buf[i:run_end]
            if any(c in STRONG_TERMINALS for c in run):
                return end
            after = _skip_space(buf, end)
            if "\n" in buf[end:after]:
                return end
            if after == n:
                return end if final else None
            if self._period_ends_sentence(i, run, buf[after]):
                return end
            i = end
        return None

    def _period_ends_sentence(self, at: int, run: str, next_char: str) -> bool:
        """Whether the periods (or ellipsis) ``run`` at ``at``, followed by white space and
        then ``next_char``, end a sentence."""
        if next_char.islower():
            return False  # "approx. five", "Well... maybe"
        if run != ".":
            return True
        head = self._buf[: at + 1].strip()
        if _LIST_NUMBER.fullmatch(head):
            return False
        words = self._buf[:at].rsplit(maxsplit=1)
        token = words[-1].lstrip(_TOKEN_STRIP) if words else ""
        word = token.lower()
        if word in ABBREVIATIONS or (len(token) > 1 and _INITIALISM.fullmatch(token)):
            return False  # "Dr.", "e.g.", "U.S.", "p.m."
        if len(token) == 1 and token.isupper() and token != "I":
            return False  # an initial: "J. Smith"
        if word in END_ABBREVIATIONS:
            return next_char.isupper()
        return True


def _skip(text: str, i: int, chars: frozenset[str]) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i
