"""The streaming sentence splitter: LLM deltas in, speakable sentences out."""

from __future__ import annotations

import pytest

from pipeline.sentences import SentenceSplitter, strip_markdown


def split(text: str, *, step: int | None = None, **options: int) -> list[str]:
    """Feed ``text`` whole, or in deltas of ``step`` characters, then flush."""
    splitter = SentenceSplitter(**options)
    out: list[str] = []
    size = step or len(text) or 1
    for i in range(0, len(text), size):
        out += splitter.feed(text[i : i + size])
    return out + splitter.flush()


def split_deltas(deltas: list[str], **options: int) -> list[list[str]]:
    """What each feed returned, then what flush returned."""
    splitter = SentenceSplitter(**options)
    return [splitter.feed(d) for d in deltas] + [splitter.flush()]


TEXT = (
    "Hello there, my friend. Dr. Smith paid $3.14 for it, e.g. at the U.S. store. "
    "Wait... really? Yes! I think so. Well... maybe not."
)
SENTENCES = [
    "Hello there, my friend.",
    "Dr. Smith paid $3.14 for it, e.g. at the U.S. store.",
    "Wait... really?",
    "Yes! I think so.",
    "Well... maybe not.",
]


@pytest.mark.parametrize("step", [None, 1, 2, 3, 5, 7])
def test_same_sentences_however_the_text_is_cut(step: int | None) -> None:
    assert split(TEXT, step=step) == SENTENCES


def test_sentence_is_released_as_soon_as_it_is_known_to_be_complete() -> None:
    out = split_deltas(["Hello there", ", my friend.", " How", " are you?", " Fine"])
    assert out == [[], [], ["Hello there, my friend."], [], ["How are you?"], ["Fine"]]


def test_question_and_exclamation_end_at_the_space() -> None:
    out = split_deltas(["Is it working?", " ", "It is!", " "], min_chars=0)
    assert out == [[], ["Is it working?"], [], ["It is!"], []]


def test_newline_ends_a_sentence() -> None:
    assert split("This is the first line\nand this is the second one") == [
        "This is the first line",
        "and this is the second one",
    ]


def test_decimals_are_not_boundaries() -> None:
    assert split("Pi is about 3.14159 and e is 2.718. Both are irrational.") == [
        "Pi is about 3.14159 and e is 2.718.",
        "Both are irrational.",
    ]
    assert split("It costs 3.", step=1) == ["It costs 3."]


@pytest.mark.parametrize(
    "text",
    [
        "Mr. Jones met Mrs. Jones and Dr. Who at noon.",
        "Bring fruit, e.g. apples, i.e. the red ones, etc. and some bread too.",
        "She moved to the U.S. Army base last year.",
        "The meeting is at 3 p.m. tomorrow in the big room.",
        "Call J. R. Smith about it today please.",
        "It was approx. five metres long.",
        "I was thinking... maybe we could go later.",
    ],
)
def test_abbreviations_and_mid_sentence_ellipses(text: str) -> None:
    assert split(text) == [text]
    assert split(text, step=1) == [text]


def test_etc_ends_a_sentence_before_a_capital() -> None:
    assert split("We have apples, pears, etc. Then we have nuts.") == [
        "We have apples, pears, etc.",
        "Then we have nuts.",
    ]


def test_abbreviation_split_across_deltas() -> None:
    out = split_deltas(["Say hi to D", "r", ".", " ", "Sm", "ith for me. ", "Bye now"])
    assert out[:-1] == [[], [], [], [], [], []] + [["Say hi to Dr. Smith for me."]]
    assert out[-1] == ["Bye now"]


def test_word_split_across_deltas() -> None:
    assert split_deltas(["The wea", "ther is ni", "ce today", ". Isn't", " it?"]) == [
        [],
        [],
        [],
        ["The weather is nice today."],
        [],
        ["Isn't it?"],
    ]


def test_short_fragments_merge_into_the_next_sentence() -> None:
    assert split("Hi! Oh. How are you doing today?") == ["Hi! Oh. How are you doing today?"]
    assert split("Sure. Here it is.", min_chars=5) == ["Sure.", "Here it is."]
    # A fragment still short at the end is not lost.
    assert split("Okay. Bye.") == ["Okay. Bye."]


def test_short_line_gets_a_pause_when_merged() -> None:
    assert split("Note\nThe oven is hot.") == ["Note. The oven is hot."]


def test_run_on_is_force_split_at_a_comma() -> None:
    clause = "and then we walked a little further along the river"
    text = ", ".join([clause] * 8) + "."
    sentences = split(text, step=4, max_chars=120)
    assert len(sentences) > 1
    assert all(len(s) <= 120 for s in sentences)
    assert all(s.endswith((",", ".")) for s in sentences)
    assert " ".join(sentences) == text


def test_run_on_without_commas_is_split_at_a_space() -> None:
    text = " ".join(["word"] * 100)
    sentences = split(text, step=3, max_chars=50)
    assert all(len(s) <= 50 for s in sentences)
    assert " ".join(sentences) == text


def test_persian() -> None:
    text = "سلام، حال شما چطور است؟ من خوبم. ممنون از شما! این جمله هم تمام شد۔ آخرین جمله"
    expected = [
        "سلام، حال شما چطور است؟",
        "من خوبم. ممنون از شما!",
        "این جمله هم تمام شد۔",
        "آخرین جمله",
    ]
    assert split(text) == expected
    assert split(text, step=1) == expected


def test_persian_question_mark_split_across_deltas() -> None:
    out = split_deltas(["اسم شما", " چیست", "؟", " اسم من", " آواتار است."])
    assert out == [[], [], [], ["اسم شما چیست؟"], [], ["اسم من آواتار است."]]


def test_closing_quotes_stay_with_their_sentence() -> None:
    assert split('He said "stop right there." Then he left the room.') == [
        'He said "stop right there."',
        "Then he left the room.",
    ]


def test_markdown_is_stripped() -> None:
    text = (
        "## Getting started\n\n"
        "**Sure!** Here are the steps:\n"
        "1. Open the *settings* page.\n"
        "2. Click `Save` to keep it.\n"
        "- See [the guide](https://example.com/guide) for more.\n"
        "```python\nprint('hi')\n```\n"
        "> That is all, have fun.\n"
        "---\n"
    )
    assert split(text, step=3) == [
        "Getting started",
        "Sure! Here are the steps:",
        "Open the settings page.",
        "Click Save to keep it.",
        "See the guide for more.",
        "print('hi') That is all, have fun.",
    ]


def test_list_numbers_are_not_sentences() -> None:
    assert split("1. Preheat the oven to 200 degrees. 2. Bake the bread for an hour.") == [
        "Preheat the oven to 200 degrees.",
        "Bake the bread for an hour.",
    ]


def test_strip_markdown() -> None:
    assert strip_markdown("# Title") == "Title"
    assert strip_markdown("* **bold** and __under__ and `code`") == "bold and under and code"
    assert strip_markdown("C# is a #1 language") == "C# is a #1 language"
    assert strip_markdown("snake_case stays") == "snake_case stays"


def test_flush_empties_and_splitter_is_reusable() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("An unfinished thought") == []
    assert splitter.flush() == ["An unfinished thought"]
    assert splitter.flush() == []
    assert splitter.feed("A new reply starts here.") == []
    assert splitter.feed(" And it") == ["A new reply starts here."]
    assert splitter.feed(" goes on.") == []
    assert splitter.flush() == ["And it goes on."]


def test_nothing_speakable_is_dropped() -> None:
    assert split("***\n\n...\n`` ``") == []
    assert split("") == []


def test_bad_options() -> None:
    with pytest.raises(ValueError):
        SentenceSplitter(min_chars=50, max_chars=20)
