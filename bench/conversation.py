"""Voice-to-voice latency and barge-in time, measured at the client.

A real server process (tiny.en, viseme engine) on loopback; the bot speaks Piper-synthesised
questions into its microphone. Voice-to-voice: from the end of the question's voice leaving the
bot (its last sample above the noise floor, not the end of the file) to the first audible reply
frame arriving at the bot, split by the server's per-turn stage
metrics. Run once with the embedded replier and once with a local OpenAI-compatible server
(the fake one from the tests, answering at once: the LLM's own time is not counted). Barge-in:
from the onset of the bot's interruption to the last audible avatar frame.

    unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.conversation [--turns N]'
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import numpy as np

from bench.common import print_table, start_server, write_result
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates
from tests.fakes.openai_server import start_fake_openai
from tests.fakes.speech import piper_speech

QUESTIONS = [
    "Hello! What is your name?",
    "How are you today?",
    "What can you do?",
    "What time is it?",
    "What is twelve times seven?",
    "Tell me about the weather.",
    "Do you like music?",
    "Thank you very much.",
    "Where do you live?",
    "What is your favourite colour?",
    "Can you hear me?",
    "Goodbye for now.",
]
STAGES = (
    "vad_end_ms",
    "stt_ms",
    "llm_first_token_ms",
    "tts_first_audio_ms",
    "lipsync_first_frame_ms",
    "voice_to_voice_ms",
)


def audible(pcm: np.ndarray, min_rms: float = 300.0) -> bool:
    return bool(pcm.size) and float(np.sqrt(np.mean(pcm.astype(np.float32) ** 2))) > min_rms


async def turns(url: str, n: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    bot = Bot(url, audio_prefetch=1)
    await bot.connect()
    await bot.wait_first_video(15)
    await asyncio.sleep(1.0)
    rows = []
    for i in range(n):
        q = piper_speech(QUESTIONS[i % len(QUESTIONS)], sample_rate=48000)
        seen = len(bot.events)
        bot.mic.play(q, 48000)
        await bot.mic.speech_ended.wait()
        # from the end of the voice, not of the file (Piper leaves some silence after it)
        voiced = np.nonzero(np.abs(q) > 0.02)[0]
        t_end = bot.mic.sent_until - (len(q) - (voiced[-1] + 1 if voiced.size else 0)) / 48000
        try:
            metrics = await bot.wait_event(
                lambda e, s=seen: e.get("type") == "metrics" and bot.events.index(e) >= s, 30
            )
        except TimeoutError:
            # no answer: counted (``unanswered``) with what the server said, not a crash
            said = [{k: e.get(k) for k in ("type", "state", "user", "text", "message")
                     if e.get(k) is not None} for e in bot.events[seen:]]
            rows.append({"turn": i + 1, "client_v2v_ms": None, "unanswered": said})
            continue
        await bot.wait_event(
            lambda e, m=metrics: e.get("state") == "listening" and e["_t"] > m["_t"], 60
        )
        heard = bot.first_voice_after(t_end)
        row = {"turn": i + 1, "client_v2v_ms": round(1000 * (heard - t_end), 1) if heard else None}
        row.update({k: metrics.get(k) for k in STAGES})
        row["end_rule"] = metrics.get("end_rule")
        row["end_wait_ms"] = metrics.get("end_wait_ms")
        rows.append(row)
        await asyncio.sleep(0.5)
    video = video_stats(await bot.server_session())
    await bot.aclose()
    return rows, video


def video_stats(info: dict[str, Any] | None) -> dict[str, Any]:
    """Frames not drawn in time over the call: every answer's first frames are drawn again
    (``rerendered``) within ``media.schedule_lead_ms``; those that miss it are ``late``."""
    if info is None:
        return {}
    return {"video_frames_sent": info.get("frames_sent", {}).get("video"),
            "frames_late": info.get("frames_late"),
            "frames_repeated": info.get("frames_repeated"),
            "rerendered": info.get("render", {}).get("rerendered")}


async def barge_ins(url: str, n: int) -> tuple[list[float], list[float]]:
    """Per interruption: onset -> last audible avatar audio at the bot, and onset -> the
    server's barge-in (its "user speaking" event arriving over the data channel)."""
    bot = Bot(url, audio_prefetch=1)
    await bot.connect()
    await bot.wait_first_video(15)
    out, detected = [], []
    # one continuous phrase: a short first word followed by a pause ("Wait, ...") is rightly
    # ignored as shorter than the minimum speech
    stop = piper_speech("Hold on a second please", sample_rate=48000)
    voiced = np.nonzero(np.abs(stop) > 0.02)[0]
    onset_offset = voiced[0] / 48000 if voiced.size else 0.0
    for _ in range(n):
        n0 = len(bot.events)
        story = "Let me tell you a long story about the sea and ships. " * 3
        bot.send({"type": "say", "text": story})
        await bot.wait_event(
            lambda e, n0=n0: e.get("state") == "speaking" and bot.events.index(e) >= n0, 20
        )
        await asyncio.sleep(1.5)
        t_play = time.monotonic()
        n1 = len(bot.events)  # the answer to the interruption may come within the 2 s below
        bot.mic.play(stop, 48000)
        onset = t_play + onset_offset
        await asyncio.sleep(2.0)
        # the last audible avatar frame before the first 300 ms of silence after the onset
        # (later audio is the avatar answering the interruption)
        last, quiet = onset, 0
        for arrival, pcm in zip(bot.audio.arrival, bot.audio.audio, strict=False):
            if arrival <= onset:
                continue
            if audible(pcm):
                last, quiet = arrival, 0
            else:
                quiet += 1
                if quiet >= 15:
                    break
        out.append(round(1000 * (last - onset), 1))
        heard = [
            e["_t"] + bot.t0
            for e in bot.events[n0:]
            if e.get("user") == "speaking" and e["_t"] + bot.t0 > t_play
        ]
        detected.append(round(1000 * (heard[0] - onset), 1) if heard else float("nan"))
        # let the avatar answer the interruption and fall quiet before the next round
        metrics = await bot.wait_event(
            lambda e, n1=n1: e.get("type") == "metrics" and bot.events.index(e) >= n1, 20
        )
        await bot.wait_event(
            lambda e, m=metrics: e.get("state") == "listening" and e["_t"] > m["_t"], 30
        )
        await asyncio.sleep(1.0)
    await bot.aclose()
    return out, detected


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"turns": len(rows),
                           "unanswered": sum(1 for r in rows if "unanswered" in r)}
    for k in ("client_v2v_ms", *STAGES):
        vals = [r[k] for r in rows if isinstance(r.get(k), int | float)]
        out[f"{k}_median"] = round(statistics.median(vals), 1) if vals else None
    return out


async def main_async(n: int, barge: int, env: dict[str, str]) -> None:
    use_host_candidates("loopback")
    results: dict[str, Any] = {"env": env}
    proc, url = start_server(env)
    try:
        rows, video = await turns(url, n)
        results["embedded"] = {"summary": summary(rows), "turns": rows, "video": video}
        results["barge_in_ms"], results["barge_in_detected_ms"] = await barge_ins(url, barge)
    finally:
        proc.terminate()
        proc.wait(10)
    llm_url, _, close = await start_fake_openai([], default=("echo",))
    try:
        proc, url = start_server(
            {**env, "AVATAR_LLM__BASE_URL": llm_url, "AVATAR_LLM__MODEL": "fake-model"}
        )
        try:
            rows, video = await turns(url, n)
            results["openai_compatible"] = {"summary": summary(rows), "turns": rows,
                                            "video": video}
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        await close()
    print("Voice-to-voice (ms), medians; client = bot's last question sample -> first reply audio")
    print_table(
        [{"replier": k, **results[k]["summary"]} for k in ("embedded", "openai_compatible")]
    )
    print("Video over the turns:", {k: results[k]["video"]
                                     for k in ("embedded", "openai_compatible")})
    b, d = results["barge_in_ms"], results["barge_in_detected_ms"]

    def median(values: list[float]) -> float | None:  # None: no barge-in measured
        return round(statistics.median(values), 1) if values else None

    print(f"\nBarge-in, speech onset -> avatar silent at the client (ms): {b} "
          f"(median {median(b)})")
    print(f"Barge-in, speech onset -> server detects it (ms): {d} (median {median(d)})")
    write_result(
        "conversation",
        {
            "note": "tiny.en int8 CPU, viseme engine, Piper joe voice; server + bot on 2 cores",
            **results,
            "barge_in_median_ms": median(b),
            "barge_in_detected_median_ms": median(d),
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--barge-ins", type=int, default=5)
    ap.add_argument("--env", action="append", default=[], metavar="AVATAR_X__Y=V",
                    help="extra server setting for both servers (repeatable)")
    args = ap.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    asyncio.run(main_async(args.turns, args.barge_ins, env))


if __name__ == "__main__":
    main()
