"""The embedded offline persona: short answers in English and Persian (greetings, names, time,
arithmetic, reflections), no network and no model."""

from __future__ import annotations

import asyncio
import re
import unicodedata
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pipeline.replier.base import Message

if TYPE_CHECKING:
    pass

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

