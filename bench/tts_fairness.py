"""The shared Piper thread under long text without a full stop, before and after bounded
synthesis units (issue 26, defect 1), with the real bundled voice.

Scenarios (each mode of each in a fresh process, so memory starts from the same place):

* ``say2000``: call A says 2,000 characters with no punctuation; call B says "Short." just
  after A's synthesis has started. Time from each say to its first audio, A's total.
* ``render5000``: a render job (render class) synthesises 5,000 characters with no
  punctuation; a call says "Short." 0.5 s later. Time to the call's first audio.
* ``cancel2000``: a render of 2,000 characters with no punctuation is cancelled (its
  consumer task, as a ``DELETE`` does) 1 s in: time from the cancel until the Piper thread
  is free, and units handed to Piper after the cancel.

Modes: ``before`` hands Piper the whole text (``max_unit_chars=None``: Piper's own split
at sentence ends only, one job per sentence, as the code was) and keeps its memory;
``units`` cuts the text into units of at most ``MAX_UNIT_CHARS``; ``after`` also gives the
memory back once the thread is idle (``release_after_s``, 2 s). Memory: the process RSS
(psutil, sampled every 10 ms) after loading and a warm-up, its peak during the scenario
and 3 s after it ended. The ``before`` mode of ``render5000`` needs ~10 GB and minutes.

    .venv/bin/python -m bench.tts_fairness [--only SCENARIO]

Writes ``bench/results/tts_fairness.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT, print_table, write_result  # noqa: E402

SCENARIOS = ("say2000", "cancel2000", "render5000")
MODES = ("before", "units", "after")
WORDS = "the quick brown fox jumps over a lazy dog while seven purple monkeys dance".split()


def no_punctuation(chars: int) -> str:
    """Words, spaces and nothing else (deterministic)."""
    out, i = "", 0
    while len(out) < chars:
        out += WORDS[(i * 7 + i // 3) % len(WORDS)] + " "
        i += 1
    return out[:chars].rstrip()


class RssSampler:
    """The peak resident memory of this process, sampled on a thread."""

    def __init__(self, every_s: float = 0.01) -> None:
        import psutil

        self._proc = psutil.Process()
        self._every = every_s
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        return int(self._proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


async def first_audio(stream: Any, t0: float, marks: dict[str, float], name: str) -> int:
    """Consume ``stream``; note when its first piece came (s after ``t0``) and its end."""
    n = 0
    async for _ in stream:
        if n == 0:
            marks[f"{name}_first_audio_s"] = round(time.perf_counter() - t0, 3)
        n += 1
    marks[f"{name}_done_s"] = round(time.perf_counter() - t0, 3)
    return n


async def scenario(name: str, mode: str) -> dict[str, Any]:
    from pipeline.speech_units import MAX_UNIT_CHARS
    from pipeline.tts import PiperTTS

    tts = PiperTTS(
        max_unit_chars=None if mode == "before" else MAX_UNIT_CHARS,
        release_after_s=2.0 if mode == "after" else None,
    )
    await tts.aload()
    async for _ in tts.sentences("Warming up the voice, once."):
        pass
    gc.collect()
    marks: dict[str, float] = {}
    sampler = RssSampler()
    base = sampler.now()
    with sampler:
        t0 = time.perf_counter()
        if name == "say2000":
            text = no_punctuation(2000)
            t_a = time.perf_counter()
            a = asyncio.create_task(
                first_audio(tts.sentences(text, owner="A"), t_a, marks, "A"))
            await asyncio.sleep(0.05)  # A's first unit is being synthesised
            t_b = time.perf_counter()
            await first_audio(tts.sentences("Short.", owner="B"), t_b, marks, "B")
            marks["A_pieces"] = await a
        else:
            text = no_punctuation(5000 if name == "render5000" else 2000)
            t_r = time.perf_counter()
            r = asyncio.create_task(
                first_audio(tts.sentences(text, owner="job", live=False), t_r, marks, "R"))
            if name == "render5000":
                await asyncio.sleep(0.5)
                t_b = time.perf_counter()
                await first_audio(tts.sentences("Short.", owner="call"), t_b, marks, "B")
                marks["R_pieces"] = await r
            else:
                await asyncio.sleep(1.0)
                counted: list[str] = []
                voice = tts._voice
                real = voice.synthesize

                def counting(unit: str, **kw: Any) -> Any:
                    counted.append(unit)
                    return real(unit, **kw)

                voice.synthesize = counting  # units handed to Piper from now on
                t_c = time.perf_counter()
                r.cancel()
                await asyncio.gather(r, return_exceptions=True)
                await asyncio.wrap_future(tts.scheduler.submit(lambda: None, owner="probe"))
                marks["cancel_to_idle_s"] = round(time.perf_counter() - t_c, 3)
                marks["units_started_after_cancel"] = len(counted)
        done = time.perf_counter()
    gc.collect()
    await asyncio.sleep(3.0)
    after = sampler.now()
    tts.close()
    units = tts.units(text)
    return {
        "scenario": name,
        "mode": mode,
        "units": len(units),
        "longest_unit": max(len(u) for u in units),
        **marks,
        "scenario_s": round(done - t0, 2),
        "rss_base_mb": round(base / 2**20),
        "rss_peak_mb": round(sampler.peak / 2**20),
        "rss_after_mb": round(after / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=SCENARIOS, action="append")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--child", nargs=2, metavar=("SCENARIO", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(scenario(*args.child))))
        return
    rows: list[dict[str, Any]] = []
    for name in args.only or SCENARIOS:
        for mode in args.modes:
            out = subprocess.run(
                [sys.executable, "-m", "bench.tts_fairness", "--child", name, mode],
                cwd=ROOT, check=True, capture_output=True, text=True,
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    previous = RESULTS / "tts_fairness.json"
    if previous.is_file():  # keep the rows of scenarios and modes not run this time
        ran = {(r["scenario"], r["mode"]) for r in rows}
        kept = [r for r in json.loads(previous.read_text()).get("rows", [])
                if (r["scenario"], r["mode"]) not in ran]
        order = {(n, m): i for i, (n, m) in
                 enumerate((n, m) for n in SCENARIOS for m in MODES)}
        rows = sorted(kept + rows, key=lambda r: order.get((r["scenario"], r["mode"]), 99))
    cols = ["scenario", "mode", "units", "longest_unit", "A_first_audio_s", "B_first_audio_s",
            "R_first_audio_s", "A_done_s", "R_done_s", "cancel_to_idle_s",
            "units_started_after_cancel", "rss_base_mb", "rss_peak_mb", "rss_after_mb"]
    table = [{c: r.get(c, "") for c in cols} for r in rows]
    print()
    print_table(table)
    path = write_result("tts_fairness", {"rows": rows})
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
