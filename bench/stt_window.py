"""Whisper's encoder window: time and words, 30 s (Whisper's own) against shorter windows.

The utterances are issue 24's set (``bench.turn_ends``): 20 whole utterances, the 20 paused
sentences said whole (with their pause), and the 20 first parts alone (what the transcript at
a pause sees), each made once with the bundled Piper voice and transcribed at every window
size (``WhisperSTT(window_s=...)``, tiny.en int8 on the CPU, one at a time, the machine idle).

For each window: the median and p90 transcription time, how many transcripts equal the 30 s
ones word for word (case and punctuation aside) and exactly, the word error rate against the
texts that were spoken (numbers spelled as Whisper writes them count as errors on both sides
alike), how many were done again in the full window (``rewindowed``), and the end-of-turn
rule each first part gets (``RuleTurnDetector``) compared with the 30 s transcript's.
Written to ``bench/results/stt_window.json``.

    .venv/bin/python -m bench.stt_window [--windows 30,20,15,10]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, write_result
from bench.turn_ends import PAUSED, PAUSES_S, WHOLE
from pipeline.stt import WhisperSTT
from pipeline.turns import RuleTurnDetector
from tests.fakes.speech import piper_speech

SR = 16_000


def words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def wer(ref: str, hyp: str) -> tuple[int, int]:
    """(edits, reference words) by Levenshtein distance over words."""
    r, h = words(ref), words(hyp)
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)], len(r)


def the_set() -> list[tuple[str, str, np.ndarray]]:
    """(kind, text spoken, audio at 16 kHz)."""
    out = [("whole", t, piper_speech(t, SR)) for t in WHOLE]
    for i, (a, b) in enumerate(PAUSED):
        pause = np.zeros(int(PAUSES_S[i % len(PAUSES_S)] * SR), np.float32)
        out.append(("paused", f"{a} {b}", np.concatenate([piper_speech(a, SR), pause,
                                                           piper_speech(b, SR)])))
    out += [("first_part", a, piper_speech(a, SR)) for a, _ in PAUSED]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", default="30,20,15,10")
    args = ap.parse_args()
    windows = [float(w) for w in args.windows.split(",")]
    items = the_set()
    rules = RuleTurnDetector()
    by_window: dict[float, list[dict[str, Any]]] = {}
    redone: dict[float, int] = {}
    cache = Path(tempfile.mkdtemp(prefix="stt-window-"))
    for w in windows:
        stt = WhisperSTT("tiny.en", cache_dir=cache, window_s=w)
        stt.load()
        stt.transcribe_sync(items[0][2])  # warm
        stt.windowed = stt.rewindowed = 0
        rows = []
        for kind, text, audio in items:
            t = stt.transcribe_sync(audio)
            rule = rules.decide(t.text, audio, "en").rule if kind == "first_part" else None
            rows.append({"kind": kind, "spoken": text, "text": t.text,
                         "ms": round(t.elapsed_s * 1000, 1), "rule": rule})
        by_window[w] = rows
        redone[w] = stt.rewindowed
        stt.close()
    ref = by_window[30.0] if 30.0 in by_window else by_window[windows[0]]
    table, summary = [], {}
    for w, rows in by_window.items():
        ms = [r["ms"] for r in rows]
        edits = sum(wer(r["spoken"], r["text"])[0] for r in rows)
        total = sum(wer(r["spoken"], r["text"])[1] for r in rows)
        pairs = list(zip(rows, ref, strict=True))
        same_words = sum(words(r["text"]) == words(b["text"]) for r, b in pairs)
        same = sum(r["text"] == b["text"] for r, b in pairs)
        same_rule = sum(r["rule"] == b["rule"] for r, b in pairs if r["kind"] == "first_part")
        row = {"window_s": w, "median_ms": round(statistics.median(ms), 1),
               "p90_ms": round(float(np.percentile(ms, 90)), 1),
               "same_words_as_30s": f"{same_words}/{len(rows)}",
               "same_text_as_30s": f"{same}/{len(rows)}",
               "wer_%": round(100 * edits / total, 1),
               "rewindowed": redone[w],
               "first_part_rule_as_30s": f"{same_rule}/{len(PAUSED)}"}
        table.append(row)
        summary[str(w)] = {**row, "transcripts": rows}
    print_table(table)
    write_result("stt_window", {"note": "tiny.en int8 CPU, one utterance at a time, idle machine",
                                "utterances": len(items), "windows": summary})


if __name__ == "__main__":
    main()
