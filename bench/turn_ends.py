"""Early cut-ins and the end-of-turn rules on a set of 40 synthesised utterances (issue 24).

The set (``UTTERANCES``): 20 whole utterances (questions and statements) and 20 sentences said
with a pause of 400-700 ms in the middle, at the places people pause: after a conjunction or a
filler ("and", "because", "so", "um", "I mean"), an article or a preposition, or a verb that
takes an object. Each is made with the bundled Piper voice, sentence part by sentence part,
joined with the pause's silence (the pause lengths cycle through 400, 500, 600 and 700 ms).

A real server (tiny.en, viseme engine, embedded replier) on loopback; the bot says each
utterance into its microphone and waits for the answer. Counted from the turns' metrics
events: the rule that ended each turn and how long it waited, the turns answered (a sentence
cut at its pause answers twice, or joins its parts: ``joined``), and the early cut-ins
(``GET /sessions``). Written to ``bench/results/turn_ends.json``.

    unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.turn_ends'
"""

from __future__ import annotations

import asyncio
import collections
import statistics
from typing import Any

import numpy as np

from bench.common import print_table, start_server, write_result
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates
from tests.fakes.speech import piper_speech

SR = 48000
WHOLE = [
    "What time is it now?", "Hello! What is your name?", "How are you today?",
    "Where do you live?", "Can you hear me?", "Do you like music?",
    "What is twelve times seven?", "Tell me about the weather.", "Thank you very much.",
    "I went to the market yesterday.", "My sister lives in a small town.",
    "The train was late again this morning.", "We watched a film last night.",
    "Please tell me a short story.", "I would like a cup of tea.",
    "How far is the nearest station?", "Why is the sky blue?", "I think it will rain today.",
    "Goodbye for now.", "That sounds like a good idea.",
]
PAUSED = [
    ("I went to the market and", "bought some fresh apples."),
    ("I stayed at home because", "it was raining all day."),
    ("We were tired so", "we went to bed early."),
    ("Um", "what was your name again?"),
    ("It was, I mean", "it was a very long day."),
    ("I would like to visit the", "old castle on the hill."),
    ("She gave the book to", "her little brother."),
    ("Can you tell me about", "the history of this town?"),
    ("My favourite food is", "spaghetti with tomato sauce."),
    ("I bought", "a new bicycle last week."),
    ("The weather today is", "warm and sunny."),
    ("If it rains tomorrow", "we will stay inside."),
    ("I need to buy some bread and", "a bottle of milk."),
    ("When I was young", "I lived near the sea."),
    ("Could you please", "speak a little slower?"),
    ("We should leave early because", "the roads will be busy."),
    ("I think that", "we need more time."),
    ("My brother and", "I play football every Sunday."),
    ("The meeting is at", "three o'clock in the afternoon."),
    ("Uh", "how long does it take?"),
]
PAUSES_S = (0.4, 0.5, 0.6, 0.7)


def utterance(parts: tuple[str, ...], pause_s: float) -> np.ndarray:
    pieces: list[np.ndarray] = []
    for i, text in enumerate(parts):
        if i:
            pieces.append(np.zeros(int(pause_s * SR), np.float32))
        pieces.append(piper_speech(text, SR))
    return np.concatenate(pieces)


async def say_all(url: str) -> list[dict[str, Any]]:
    bot = Bot(url, audio_prefetch=1)
    await bot.connect()
    await bot.wait_first_video(15)
    await asyncio.sleep(1.0)
    rows = []
    items = [((t,), 0.0, "whole") for t in WHOLE] + [
        (p, PAUSES_S[i % len(PAUSES_S)], "paused") for i, p in enumerate(PAUSED)]
    for parts, pause_s, kind in items:
        seen = len(bot.events)
        bot.mic.play(utterance(parts, pause_s), SR)
        await bot.mic.speech_ended.wait()
        await asyncio.sleep(3.0)  # the turn (or turns) it makes, answered
        await bot.wait_event(lambda e, s=seen: e.get("state") == "listening"
                             and bot.events.index(e) >= s, 30)
        new = bot.events[seen:]
        metrics = [e for e in new if e.get("type") == "metrics"]
        users = [e["text"] for e in new if e.get("type") == "transcript"
                 and e.get("role") == "user"]
        rows.append({"kind": kind, "text": " … ".join(parts), "pause_ms": int(pause_s * 1000),
                     "turns": len(metrics), "heard": users,
                     "end_rules": [m.get("end_rule") for m in metrics],
                     "end_wait_ms": [m.get("end_wait_ms") for m in metrics],
                     "vad_end_ms": [m.get("vad_end_ms") for m in metrics],
                     "joined": sum(1 for m in metrics if m.get("joined") == 1.0)})
        await asyncio.sleep(0.5)
    session = await bot.server_session()
    await bot.aclose()
    rows.append({"kind": "session", "early_cut_ins": (session or {}).get("early_cut_ins")})
    return rows


async def main_async() -> None:
    use_host_candidates("loopback")
    proc, url = start_server()
    try:
        rows = await say_all(url)
    finally:
        proc.terminate()
        proc.wait(10)
    session = rows.pop()
    paused = [r for r in rows if r["kind"] == "paused"]
    cut = [r for r in paused if r["turns"] > 1 or r["joined"]]
    rules = collections.Counter(rule for r in rows for rule in r["end_rules"])
    ends = [v for r in rows if r["kind"] == "whole" for v in r["vad_end_ms"] if v is not None]
    summary = {
        "utterances": len(rows), "paused": len(paused),
        "cut_at_the_pause": len(cut), "cut_share": round(len(cut) / max(1, len(paused)), 3),
        "early_cut_ins": session["early_cut_ins"], "rules": dict(rules),
        "whole_vad_end_ms_median": round(statistics.median(ends), 1) if ends else None,
    }
    print_table([{k: r[k] for k in ("kind", "pause_ms", "turns", "joined", "end_rules")}
                 for r in rows])
    print(summary)
    print(write_result("turn_ends", {"summary": summary, "utterances": rows,
                                     "set": "20 whole + 20 with a 400-700 ms pause; Piper "
                                            "joe voice, parts joined by silence"}))


def main() -> None:
    asyncio.run(main_async())


if __name__ == "__main__":
    main()
