"""Headless bot: joins a call like a browser would and measures what it receives.

``python -m rtc_server.bot --url URL [--mic FILE.wav] [--say TEXT] [--seconds N]
[--record OUT.mp4] [--clapper N] [--avatar ID] [--token TOKEN] [--api-key KEY]
[--video-codecs H264,VP8]``

Prints one JSON summary: time to first video/audio frame, fps received, frame-interval
jitter, audio gaps, state events, and the A/V offset of a clapper segment measured as a
browser lines the streams up: each stream's RTP timestamps mapped to the sender's wall clock
through its RTCP sender reports (and, for reference, by arrival time)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any
from urllib.parse import urlparse

import aiohttp
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaPlayer, MediaRecorder, MediaRelay
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpreceiver import RtcpSrPacket
from av import AudioFrame

from media_tracks.aiortc_compat import (
    give_sender_encoder,
    negotiated_codec_name,
    receiver_rtp_origin,
    use_host_candidates,
)
from media_tracks.clapper import detect_beep_onsets, detect_flash_onsets, pair_offsets_ms
from media_tracks.encoders import video_codec_preferences
from rtc_server.bot_dtx import DtxOpusEncoder, answer_asks_dtx

NTP_EPOCH_OFFSET = 0  # both streams' SRs use the same sender clock; only differences matter


@dataclass
class StreamLog:
    """What one receiver decoded: relative RTP pts and local arrival time (monotonic s)."""

    kind: str
    clock_rate: int
    pts: list[int] = field(default_factory=list)
    arrival: list[float] = field(default_factory=list)
    lumas: list[float] = field(default_factory=list)  # video: mean luma per frame
    audio: list[np.ndarray] = field(default_factory=list)  # audio: mono int16 per frame
    # (ntp64, raw rtp timestamp, local arrival monotonic s) of each RTCP sender report
    sender_reports: list[tuple[int, int, float]] = field(default_factory=list)
    receiver: RTCRtpReceiver | None = None

    def rtp_origin(self) -> int | None:
        origin = receiver_rtp_origin(self.receiver)
        return origin if isinstance(origin, int) else None

    def sender_time_s(self, rel_pts: int, at: float) -> float | None:
        """Sender wall-clock time (s, NTP) of relative pts, estimated as a browser does it at
        local time ``at``: the RTP->NTP offset averaged over the last 20 reports by then."""
        origin = self.rtp_origin()
        reports = [r for r in self.sender_reports if r[2] <= at][-20:]
        if origin is None or not reports:
            return None
        raw = (origin + rel_pts) & 0xFFFFFFFF
        offsets = []
        for ntp, rtp_sr, _ in reports:
            diff = ((raw - rtp_sr + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)  # signed 32-bit
            offsets.append((ntp >> 32) + (ntp & 0xFFFFFFFF) / 2**32 + diff / self.clock_rate)
        return statistics.fmean(offsets)


def instrument(receiver: RTCRtpReceiver, log: StreamLog) -> None:
    """Record the RTCP sender reports a receiver gets (aiortc keeps only stats of them)."""
    log.receiver = receiver
    original = receiver._handle_rtcp_packet

    async def handle(packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            log.sender_reports.append(
                (
                    packet.sender_info.ntp_timestamp,
                    packet.sender_info.rtp_timestamp,
                    time.monotonic(),
                )
            )
        await original(packet)

    receiver._handle_rtcp_packet = handle  # type: ignore[method-assign]


def is_loopback_url(url: str) -> bool:
    host = urlparse(url).hostname or ""
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
        )
    except (OSError, ValueError):
        return False


class MicTrack(MediaStreamTrack):
    """The bot's microphone: silence, and whatever ``play`` queues, in real time (20 ms
    frames of 48 kHz mono s16). ``speech_ended`` is set when queued audio has all been sent."""

    kind = "audio"
    RATE = 48_000
    FRAME = 960

    def __init__(self) -> None:
        super().__init__()
        self._pending = np.zeros(0, np.int16)
        self._start: float | None = None
        self._pts = 0
        self.sent_until = 0.0  # time.monotonic() when the last queued sample was sent
        self.speech_ended = asyncio.Event()

    def play(self, pcm: np.ndarray, sample_rate: int = RATE) -> None:
        """Queue int16 (or float -1..1) mono audio to be spoken into the call."""
        if pcm.dtype != np.int16:
            pcm = (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)
        if sample_rate != self.RATE:
            from pipeline.tts import resample_int16

            pcm = resample_int16(pcm, sample_rate, self.RATE)
        self._pending = np.concatenate([self._pending, pcm])
        self.speech_ended.clear()

    @property
    def speaking(self) -> bool:
        return self._pending.size > 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            self._pts += self.FRAME
            wait = self._start + self._pts / self.RATE - now
            if wait > 0:
                await asyncio.sleep(wait)
        chunk = self._pending[: self.FRAME]
        had = self._pending.size > 0
        self._pending = self._pending[self.FRAME :]
        if chunk.size < self.FRAME:
            chunk = np.concatenate([chunk, np.zeros(self.FRAME - chunk.size, np.int16)])
        if had and self._pending.size == 0:
            self.sent_until = time.monotonic()
            self.speech_ended.set()
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.RATE
        frame.pts = self._pts
        frame.time_base = Fraction(1, self.RATE)
        return frame


class Bot:
    def __init__(
        self,
        url: str,
        *,
        mic: str | None = None,
        avatar_id: str | None = None,
        record: str | None = None,
        audio_prefetch: int | None = None,
        token: str | None = None,
        api_key: str | None = None,
        video_codecs: Sequence[str] | None = None,
        dtx: bool = True,
    ) -> None:
        """audio_prefetch: 20 ms audio frames the receiver waits for before handing one on
        (None: aiortc's 4). The bot records, it never plays: 1 measures what arrives when it
        arrives. token: the server's ``access.offer_token``, sent with the offer; api_key: one
        of its ``access.api_keys``, sent to the admin route ``GET /sessions`` (and with the
        offer, where it also opens the door). video_codecs: the video codecs the offer lists,
        in that order ("VP8", "H264"; None: aiortc's, VP8 first), as a browser that prefers
        or only has some of them would. dtx: send the silent microphone (no ``mic`` file)
        with Opus DTX when the answer asks for it, as a browser does (``rtc_server.bot_dtx``)."""
        self.url = url.rstrip("/")
        self._token = token
        self._api_key = api_key
        self.audio_prefetch = audio_prefetch
        self.avatar_id = avatar_id
        self.video_codecs = tuple(video_codecs) if video_codecs else None
        self.dtx = dtx
        self.dtx_encoder: DtxOpusEncoder | None = None  # sending, when the answer asked
        # the video codec the server's answer chose ("VP8", "H264"), once connected
        self.video_codec: str | None = None
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.video = StreamLog("video", 90_000)
        self.audio = StreamLog("audio", 48_000)
        self.events: list[dict[str, Any]] = []
        # called with each decoded video frame's luma plane (H x W uint8), as it arrives
        self.on_video_luma: Callable[[np.ndarray], None] | None = None
        self.session_id: str | None = None
        self.t0 = 0.0
        self._player = MediaPlayer(mic, loop=True) if mic else None
        self.mic = MicTrack()  # used when no mic file is given: silence until ``mic.play``
        self._recorder = MediaRecorder(record) if record else None
        self._relay = MediaRelay()
        self._tasks: list[asyncio.Task[None]] = []
        self._opened = asyncio.Event()
        self._first_video = asyncio.Event()
        self._event_cond = asyncio.Condition()
        self.channel = self.pc.createDataChannel("control")
        self.channel.on("open", self._opened.set)
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)

    def _on_message(self, raw: str | bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            return
        event["_t"] = round(time.monotonic() - self.t0, 4)
        self.events.append(event)

        async def notify() -> None:
            async with self._event_cond:
                self._event_cond.notify_all()

        self._tasks.append(asyncio.ensure_future(notify()))

    async def wait_event(self, pred: Any, limit_s: float) -> dict[str, Any]:
        """The first event (already received or coming) for which ``pred(event)`` is true."""
        seen = 0

        async def find() -> dict[str, Any]:
            nonlocal seen
            async with self._event_cond:
                while True:
                    for e in self.events[seen:]:
                        if pred(e):
                            return e
                    seen = len(self.events)
                    await self._event_cond.wait()

        return await asyncio.wait_for(find(), limit_s)

    def _on_track(self, track: MediaStreamTrack) -> None:
        log = self.video if track.kind == "video" else self.audio
        if track.kind == "audio" and self.audio_prefetch is not None:
            from rtc_server.session import set_audio_prefetch

            set_audio_prefetch(self.pc, track, self.audio_prefetch)
        if self._recorder is not None:
            # both the recorder and the measurements need every frame
            self._recorder.addTrack(self._relay.subscribe(track))
            track = self._relay.subscribe(track)
        self._tasks.append(asyncio.ensure_future(self._consume(track, log)))

    async def _consume(self, track: MediaStreamTrack, log: StreamLog) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            log.arrival.append(time.monotonic())
            log.pts.append(int(frame.pts or 0))
            if log.kind == "video":
                y = frame.to_ndarray()  # type: ignore[union-attr]
                if frame.format.name == "yuv420p":  # type: ignore[union-attr]
                    y = y[: frame.height]  # type: ignore[union-attr]
                log.lumas.append(float(y.mean()))
                if self.on_video_luma is not None:
                    self.on_video_luma(y)
                self._first_video.set()
            else:
                arr = frame.to_ndarray()  # type: ignore[union-attr]
                channels = len(frame.layout.channels)  # type: ignore[union-attr]
                log.audio.append(arr.reshape(-1, channels)[:, 0].astype(np.int16))

    def first_voice_after(self, t: float, *, min_rms: float = 300.0) -> float | None:
        """Arrival time (time.monotonic()) of the first received audio frame after ``t`` whose
        level is above ``min_rms`` (int16 units), or None."""
        for arrival, pcm in zip(self.audio.arrival, self.audio.audio, strict=False):
            if arrival > t and pcm.size:
                rms = float(np.sqrt(np.mean(pcm.astype(np.float32) ** 2)))
                if rms > min_rms:
                    return arrival
        return None

    async def connect(self) -> None:
        self.t0 = time.monotonic()
        mic_track: MediaStreamTrack = self.mic
        if self._player is not None and self._player.audio is not None:
            mic_track = self._player.audio
        self.pc.addTransceiver(mic_track, direction="sendrecv")
        video_tr = self.pc.addTransceiver("video", direction="recvonly")
        if self.video_codecs:
            video_tr.setCodecPreferences(video_codec_preferences(self.video_codecs))
        audio_tr = self.pc.getTransceivers()[0]
        instrument(audio_tr.receiver, self.audio)
        instrument(video_tr.receiver, self.video)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body: dict[str, Any] = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        if self.avatar_id:
            body["avatar_id"] = self.avatar_id
        headers: dict[str, str] = {}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if self._api_key:
            headers["X-API-Key"] = self._api_key
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.url}/offer", json=body, headers=headers) as resp:
                answer = await _json_or_text(resp)
                if resp.status != 200:
                    raise RuntimeError(f"offer refused: {resp.status} {answer}")
        self.session_id = answer["session_id"]
        self.node_id: str | None = answer.get("node_id")  # the node, behind a front
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        self.video_codec = negotiated_codec_name(video_tr)
        if self.dtx and mic_track is self.mic and answer_asks_dtx(answer["sdp"]):
            self.dtx_encoder = DtxOpusEncoder()
            if not give_sender_encoder(audio_tr.sender, self.dtx_encoder):
                self.dtx_encoder = None
        if self._recorder is not None:
            await self._recorder.start()
        await asyncio.wait_for(self._opened.wait(), 15)

    def send(self, message: dict[str, Any]) -> None:
        self.channel.send(json.dumps(message))

    async def server_session(self) -> dict[str, Any] | None:
        """This call as the server's ``GET /sessions`` describes it (an admin route: the
        server wants the API key, or a client on its own machine when it has none)."""
        headers = {"X-API-Key": self._api_key} if self._api_key else {}
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.url}/sessions", headers=headers) as resp,
        ):
            body = await _json_or_text(resp)
        if resp.status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"GET /sessions refused: {resp.status} {body}")
        return next((s for s in body["sessions"] if s["id"] == self.session_id), None)

    async def wait_first_video(self, limit_s: float) -> None:
        """Wait (at most ``limit_s``) for the first decoded video frame."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_video.wait(), limit_s)

    async def aclose(self) -> None:
        if self._recorder is not None:
            await self._recorder.stop()
        if self._player is not None and self._player.audio is not None:
            self._player.audio.stop()
        await self.pc.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- analysis -------------------------------------------------------------------------
    def av_offsets(self) -> dict[str, list[float]]:
        """Clapper offsets (beep - flash, ms; positive = audio late): by sender clock through
        RTCP sender reports, and by local arrival time."""
        if not self.audio.audio or not self.video.lumas:
            return {"sender_clock": [], "arrival": []}
        flashes = detect_flash_onsets(self.video.lumas)
        sizes = [len(a) for a in self.audio.audio]
        samples = np.concatenate(self.audio.audio)
        starts = np.cumsum([0, *sizes[:-1]])
        beeps = detect_beep_onsets(samples, 48_000)
        out: dict[str, list[float]] = {"sender_clock": [], "arrival": []}
        beep_sender, beep_arrival = [], []
        for b in beeps:
            i = int(np.searchsorted(starts, b, side="right") - 1)
            rel_pts = self.audio.pts[i] + (b - int(starts[i]))
            s = self.audio.sender_time_s(rel_pts, self.audio.arrival[i])
            if s is not None:
                beep_sender.append(s * 1000)
            beep_arrival.append((self.audio.arrival[i] + (b - int(starts[i])) / 48_000) * 1000)
        flash_sender, flash_arrival = [], []
        for f in flashes:
            s = self.video.sender_time_s(self.video.pts[f], self.video.arrival[f])
            if s is not None:
                flash_sender.append(s * 1000)
            flash_arrival.append(self.video.arrival[f] * 1000)
        out["sender_clock"] = [round(x, 2) for x in pair_offsets_ms(beep_sender, flash_sender)]
        out["arrival"] = [round(x, 2) for x in pair_offsets_ms(beep_arrival, flash_arrival)]
        return out

    def summary(self, window: tuple[float, float] | None = None) -> dict[str, Any]:
        v, a = self.video, self.audio
        arr = v.arrival
        if window is not None:
            arr = [t for t in arr if window[0] <= t - self.t0 <= window[1]]
        intervals = np.diff(arr) * 1000 if len(arr) > 2 else np.zeros(0)
        duration = (arr[-1] - arr[0]) if len(arr) > 1 else 0.0
        gaps, gap_ms = 0, 0.0
        for p0, p1, n0 in zip(a.pts, a.pts[1:], a.audio, strict=False):
            missing = p1 - p0 - len(n0)
            if missing > 0:
                gaps += 1
                gap_ms += missing / 48
        offsets = self.av_offsets()
        sender = offsets["sender_clock"]
        return {
            "session_id": self.session_id,
            "video_codec": self.video_codec,
            "first_video_frame_ms": round((v.arrival[0] - self.t0) * 1000, 1)
            if v.arrival
            else None,
            "first_audio_frame_ms": round((a.arrival[0] - self.t0) * 1000, 1)
            if a.arrival
            else None,
            "video_frames": len(v.arrival),
            "audio_frames": len(a.arrival),
            "fps_received": round((len(arr) - 1) / duration, 2) if duration > 0 else 0.0,
            "frame_interval_ms": {
                "mean": round(float(intervals.mean()), 2) if intervals.size else None,
                "jitter_std": round(float(intervals.std()), 2) if intervals.size else None,
                "max": round(float(intervals.max()), 2) if intervals.size else None,
            },
            "audio_gaps": {"count": gaps, "total_ms": round(gap_ms, 1)},
            "mic_dtx": None if (d := self.dtx_encoder) is None
            else {"packets_sent": d.sent, "left_out": d.left_out},
            "av_offset_ms": round(statistics.mean(sender), 2) if sender else None,
            "av_offsets_ms": offsets,
            "events": [e for e in self.events if e.get("type") != "hello"],
        }


async def _json_or_text(resp: aiohttp.ClientResponse) -> Any:
    """The answer's JSON, or (a proxy's error page...) the start of its text."""
    try:
        return await resp.json(content_type=None)
    except ValueError:
        return (await resp.text(errors="replace"))[:200]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.ice == "loopback" or (args.ice == "auto" and is_loopback_url(args.url)):
        use_host_candidates("loopback")
    bot = Bot(
        args.url,
        mic=args.mic,
        avatar_id=args.avatar,
        record=args.record,
        token=args.token,
        api_key=args.api_key,
        video_codecs=[c.strip() for c in args.video_codecs.split(",")]
        if args.video_codecs
        else None,
        dtx=not args.no_dtx,
    )
    try:
        await bot.connect()
        await bot.wait_first_video(15)
        if args.say:
            bot.send({"type": "say", "text": args.say})
        if args.clapper:
            bot.send({"type": "clapper", "count": args.clapper})
        await asyncio.sleep(args.seconds)
        try:
            server: dict[str, Any] | None = await bot.server_session()
        except RuntimeError as exc:  # no API key for a remote server: keep the summary
            server = {"error": str(exc)}
        return {**bot.summary(), "server": server}
    finally:
        with contextlib.suppress(Exception):
            await bot.aclose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtc_server.bot", description=__doc__)
    p.add_argument("--url", required=True, help="server base URL, e.g. http://localhost:8080")
    p.add_argument("--mic", help="a WAV file sent (looped) as the bot's microphone")
    p.add_argument("--say", help="text for the avatar to speak once connected")
    p.add_argument("--clapper", type=int, default=0, help="play an A/V sync test of N flashes")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to stay in the call")
    p.add_argument("--record", help="record received audio+video to this file (.mp4)")
    p.add_argument("--avatar", help="avatar id to request")
    p.add_argument(
        "--token",
        default=os.environ.get("AVATAR_BOT_TOKEN") or None,
        help="the server's access.offer_token (default: $AVATAR_BOT_TOKEN, which "
        "keeps it out of the process list)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("AVATAR_BOT_API_KEY") or None,
        help="an API key of the server, for GET /sessions (default: $AVATAR_BOT_API_KEY)",
    )
    p.add_argument(
        "--video-codecs",
        help="the video codecs to offer, in order (e.g. H264 "
        "for a browser that has only H.264; default: aiortc's, VP8 first)",
    )
    p.add_argument("--no-dtx", action="store_true",
                   help="send the silent microphone without Opus DTX even when asked")
    p.add_argument(
        "--ice",
        choices=["auto", "all", "loopback"],
        default="auto",
        help="host candidates: loopback for a loopback URL (auto) or all interfaces",
    )
    args = p.parse_args(argv)
    try:
        summary = asyncio.run(run(args))
    except (RuntimeError, OSError, TimeoutError, aiohttp.ClientError) as exc:
        print(json.dumps({"error": str(exc) or type(exc).__name__}))
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
