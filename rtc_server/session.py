"""One call: a peer connection, its media clock, compositor, tracks and control channel.

Everything a session starts it also stops: ``aclose()`` cancels and awaits every task, stops
the tracks, closes the peer connection and removes the session from its registry.

Limits (``sessions.*``), checked by the session's watchdog against an injectable time source:
a session that never connects (``connect_timeout_s``), a call that reaches ``max_call_s``, no
speech heard and no control message for ``idle_timeout_s``, and a client that stopped sending
media for ``media_timeout_s`` (a killed tab or process). Before closing for a limit the client
is sent ``{"type": "closing", "reason", "detail"}``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any

import numpy as np
from aiortc import MediaStreamTrack, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.codecs.base import Encoder
from aiortc.mediastreams import MediaStreamError

from common.errors import BadRequest
from common.inputs import short
from config import Settings
from face.library import LoadedAvatar
from media_tracks import (
    AvatarAudioTrack,
    AvatarVideoTrack,
    Compositor,
    FrameProducer,
    MediaClock,
    Segment,
)
from media_tracks.aiortc_compat import negotiated_codec_name, request_opus_dtx
from media_tracks.audio_encoder import install_session_audio_encoder
from media_tracks.clapper import clapper_pcm, flash_frames
from media_tracks.encoders import (
    VideoEncoding,
    describe_encoder,
    install_video_encoder,
    unmatched_video_codecs,
    video_codec_preferences,
)
from media_tracks.expressive import CallExpression
from media_tracks.priority import LoadGovernor
from pipeline.lipsync import LipSyncEngine, SessionLipSync
from pipeline.replier import EmbeddedReplier, Replier
from pipeline.speaking import Speaker
from pipeline.tts import TextToSpeech
from pipeline.turns import turn_detector
from rtc_server.conversation import Conversation, make_conversation_parts
from rtc_server.ice import resolve_ice_servers, rtc_configuration
from rtc_server.mic import MicStats, frame_power, set_audio_prefetch, tap_microphone
from rtc_server.protocol import (
    Chat,
    Clapper,
    Closing,
    Error,
    Event,
    Hello,
    Interrupt,
    LipSync,
    Refused,
    Say,
    State,
    Transcript,
    parse_control,
)
from rtc_server.session_info import describe_session

logger = logging.getLogger(__name__)

# How far ahead of playback a ``say`` text is synthesised: a long text is made sentence by
# sentence as it plays, not all at once (a burst of several core-seconds that starves the
# rendering of every call on the machine for as long).
SPEECH_AHEAD_NS = 3 * 1_000_000_000

MAX_QUEUED_SAYS = 16
# how long a "closing" event is given to leave before the peer connection is closed
CLOSING_LINGER_S = 0.5


class Session:
    def __init__(
        self,
        *,
        settings: Settings,
        avatar: LoadedAvatar,
        tts: TextToSpeech,
        lipsync: LipSyncEngine,
        render_executor: Executor | None,
        on_closed: Callable[[Session], None],
        clock: MediaClock | None = None,
        stt: Any | None = None,
        vad_model: Any | None = None,
        replier: Replier | None = None,
        on_event: Callable[[Session, dict[str, object]], None] | None = None,
        fallback_lipsync: LipSyncEngine | None = None,
        now: Callable[[], float] = time.monotonic,
        on_connected: Callable[[Session], None] | None = None,
        governor: LoadGovernor | None = None,
    ) -> None:
        """``fallback_lipsync``: the engine this call switches to for good if ``lipsync`` fails
        in it (None: a failure is only logged). ``now``: seconds of a monotonic clock (the
        limits are measured with it; tests pass a fake). ``on_connected``: called once, when
        the peer connection first connects (rendering starts then, not before). ``governor``: sheds
        video frames when the event loop lags (``media_tracks.priority``; None: never)."""
        self.id = uuid.uuid4().hex
        self.settings = settings
        self.avatar = avatar
        self.state = "new"
        self._now = now
        self.created_monotonic = now()
        self.connected_at: float | None = None
        # the idle timeout runs from the last speech start heard or control message
        self.last_heard = self.created_monotonic
        # the media timeout runs from the last frame received on any remote track (None
        # until the first: a receive-only client sends none and is left to ICE)
        self.last_media: float | None = None
        self.close_reason: str | None = None
        self.mic = MicStats()
        self._tts = tts
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        # the configured engine, or the fallback for the rest of the call once it failed
        self.lipsync = SessionLipSync(lipsync, fallback_lipsync, on_failure=self._lipsync_failed,
                                      on_degrade=self._lipsync_degraded)
        self._render_executor = render_executor
        self._say_job: asyncio.Task[None] | None = None
        self._clapper: asyncio.Task[None] | None = None  # being built
        self._on_closed = on_closed
        self._on_connected = on_connected
        self._on_event = on_event
        self._tasks: set[asyncio.Task[Any]] = set()
        self._channel: RTCDataChannel | None = None
        self._says: asyncio.Queue[str] = asyncio.Queue(MAX_QUEUED_SAYS)
        self._closed = asyncio.Event()
        self._closing = False
        self._disconnect_timer: asyncio.TimerHandle | None = None
        # the video codec negotiated ("VP8", "H264") and our encoder on its sender, once the
        # offer is answered (None: aiortc's own encoder)
        self.video_codec: str | None = None
        self.video_encoder: Encoder | None = None
        self.audio_encoder: Encoder | None = None  # ours for Opus (None: aiortc's)

        media = settings.media
        self.clock = clock or MediaClock()
        self.compositor = Compositor(
            clock=self.clock,
            fps=media.fps,
            sample_rate=media.audio_sample_rate,
            schedule_lead_ms=self.lipsync.schedule_lead_ms or media.schedule_lead_ms,
            crossfade_frames=media.crossfade_frames,
            on_event=self._on_media_event,
        )
        lead_ms = self.lipsync.render_lead_ms or media.render_lead_ms
        self.expression = None if not settings.expression.enabled else CallExpression(
            self.compositor, strength=settings.expression.strength, lead_ns=lead_ms * 1_000_000)
        idle = avatar.new_timeline()
        renderer = self.lipsync.renderer(
            avatar,
            idle if self.expression is None else self.expression.timeline(idle),
            width=media.video_width,
            height=media.video_height,
            executor=render_executor,
            misses=lambda: self.frames.stats.late + self.frames.stats.skipped,
        )
        self.frames = FrameProducer(
            clock=self.clock,
            compositor=self.compositor,
            renderer=renderer,
            lead_ms=lead_ms,
            group=self.lipsync.frame_group,
            stride=None if governor is None else (lambda: governor.stride),
            audio_frame_ns=media.audio_frame_ms * 1_000_000,
        )
        self.audio_track = AvatarAudioTrack(
            clock=self.clock,
            compositor=self.compositor,
            sample_rate=media.audio_sample_rate,
            frame_samples=media.audio_frame_samples,
        )
        self.video_track = AvatarVideoTrack(
            clock=self.clock, compositor=self.compositor, frames=self.frames,
            stride=None if governor is None else (lambda: governor.stride),
        )
        # the one speaking path: say messages and the conversation's replies
        self.speaker = Speaker(tts, self.lipsync, fps=media.fps, owner=self.id,
                               executor=render_executor)
        listener, resampler = make_conversation_parts(settings, vad_model if stt else None)
        self.conversation = Conversation(
            self,
            settings=settings,
            speaker=self.speaker,
            replier=replier or EmbeddedReplier(),
            stt=stt,
            listener=listener,
            resampler=resampler,
            on_speech=self.heard,
            on_cue=None if self.expression is None else self.expression.cue,
            turn_detector=None if listener is None else turn_detector(settings),
        )
        self.pc = RTCPeerConnection(rtc_configuration(resolve_ice_servers(settings.webrtc)))
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)

    # --- lifecycle ------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{name}:{self.id[:8]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def accept_offer(self, sdp: str) -> RTCSessionDescription:
        """Apply the remote offer and return the answer (ICE gathering complete)."""
        # The server's transceivers exist before the offer is applied, so the video codec
        # preferences (webrtc.video_codecs) decide the answer's codec order; aiortc would
        # otherwise follow the offer's order (Safari lists H.264 first).
        audio = self.pc.addTransceiver(self.audio_track, direction="sendrecv")
        video = self.pc.addTransceiver(self.video_track, direction="sendrecv")
        video.setCodecPreferences(video_codec_preferences(self.settings.webrtc.video_codecs))
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:  # aiortc raises ValueError, KeyError, ... on bad SDP
            offered = unmatched_video_codecs(sdp, self.settings.webrtc.video_codecs)
            if offered is not None:
                configured = ", ".join(self.settings.webrtc.video_codecs)
                raise BadRequest(
                    f"the offer's video codecs ({', '.join(offered) or 'none'}) include none "
                    f"this server sends ({configured}; webrtc.video_codecs)"
                ) from exc
            raise BadRequest(f"offer SDP rejected: {exc or type(exc).__name__}") from exc
        # the transceivers the offer's m-lines were matched to have a mid
        kinds = {t.kind for t in self.pc.getTransceivers() if t.mid is not None}
        if "video" not in kinds or "audio" not in kinds:
            raise BadRequest("the offer must have an audio and a video m-line")
        if "a=fingerprint:" not in sdp:
            # aiortc accepts it, then its DTLS start fails in a task nobody awaits
            raise BadRequest("the offer has no DTLS fingerprint (a=fingerprint)")
        if self.settings.webrtc.opus_dtx:  # the caller's silence then mostly stays home
            request_opus_dtx(audio)
        try:
            answer = await self.pc.createAnswer()
            await self.pc.setLocalDescription(answer)
        except Exception as exc:  # e.g. an a=mid aiortc cannot answer: the offer's fault
            logger.info("no answer to an offer: %r", exc)
            raise BadRequest(
                "no answer can be made to this offer (its media sections cannot be matched; "
                "send the offer as the browser made it)"
            ) from exc
        # before the event loop runs again: the sender starts once DTLS connects
        self.video_codec = negotiated_codec_name(video)
        self.video_encoder = install_video_encoder(
            video, VideoEncoding.from_settings(self.settings)
        )
        logger.info("session %s video %s", self.id[:8],
                    describe_encoder(self.video_encoder, self.video_codec))
        self.audio_encoder = install_session_audio_encoder(audio, self.audio_track, self.settings)
        self.state = "connecting"
        # frames are rendered from when the peer connects: an offer that never connects costs
        # no rendering (the video track renders on demand if asked before that)
        self._spawn(self._say_worker(), "say")
        self._spawn(self._watchdog(), "watchdog")
        local = self.pc.localDescription
        return RTCSessionDescription(sdp=local.sdp, type=local.type)

    async def aclose(self, reason: str = "closed") -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        if self.close_reason is None:
            self.close_reason = reason
        logger.info("session %s closing: %s", self.id[:8], reason)
        if self._disconnect_timer is not None:
            self._disconnect_timer.cancel()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.conversation.aclose()
        await self.frames.aclose()
        self.audio_track.stop()
        self.video_track.stop()
        with contextlib.suppress(Exception):
            await self.pc.close()
        # The encoder's codec holds MBs of frame buffers. A closed session sits in reference
        # cycles (callbacks) until a full GC pass, which a server with large models makes
        # rare: let the codec go now (the sender dropped its reference when RTP stopped).
        self.video_encoder = None
        self.state = "closed"
        self._closed.set()
        self._on_closed(self)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        logger.info("session %s connection %s", self.id[:8], state)
        if self._closing:
            return
        if state == "connected":
            self.state = "connected"
            if self.connected_at is None:
                self.connected_at = self._now()
                self.frames.start()
                if self._on_connected is not None:
                    self._on_connected(self)
            if self._disconnect_timer is not None:
                self._disconnect_timer.cancel()
                self._disconnect_timer = None
        elif state in ("failed", "closed"):
            self.state = state
            self._spawn(self.aclose(f"peer connection {state}"), "close")
        elif state == "disconnected":
            self.state = "disconnected"
            grace = self.settings.sessions.disconnect_grace_s
            loop = asyncio.get_running_loop()
            self._disconnect_timer = loop.call_later(
                grace, lambda: self._spawn(self.aclose("disconnected past grace"), "close")
            )

    def heard(self) -> None:
        """The client spoke (VAD speech start) or sent a control message: not idle."""
        self.last_heard = self._now()

    def check_limits(self) -> tuple[str, str] | None:
        """The limit this session has reached now, as (reason, detail), or None."""
        cfg = self.settings.sessions
        now = self._now()
        if self.state == "connecting" and now - self.created_monotonic > cfg.connect_timeout_s:
            return "connect_timeout", "the call never connected"
        if cfg.max_call_s > 0 and now - self.created_monotonic >= cfg.max_call_s:
            return "call_limit", f"calls last at most {cfg.max_call_s:g} s"
        if cfg.idle_timeout_s > 0 and now - self.last_heard >= cfg.idle_timeout_s:
            return "idle", (f"nothing heard from you and no message for {cfg.idle_timeout_s:g} s")
        if (
            cfg.media_timeout_s > 0
            and self.connected_at is not None
            and self.last_media is not None
            and now - max(self.last_media, self.connected_at) >= cfg.media_timeout_s
        ):
            return "media_timeout", f"no media received for {cfg.media_timeout_s:g} s"
        return None

    def _watchdog_period_s(self) -> float:
        cfg = self.settings.sessions
        limits = [cfg.connect_timeout_s, cfg.max_call_s, cfg.idle_timeout_s, cfg.media_timeout_s]
        return min(1.0, max(0.05, min(x for x in limits if x > 0) / 8))

    async def _watchdog(self) -> None:
        """Close the session when it reaches a limit (see ``check_limits``)."""
        period = self._watchdog_period_s()
        while True:
            await asyncio.sleep(period)
            reached = self.check_limits()
            if reached is not None:
                reason, detail = reached
                self._spawn(self.end(reason, detail), "close")
                return

    def notify_closing(self, reason: str, detail: str) -> None:
        """Tell the client why the call is about to end (``closing`` event)."""
        self.send_event(Closing(reason, detail))

    async def end(self, reason: str, detail: str, *, linger_s: float = CLOSING_LINGER_S) -> None:
        """Tell the client, give the message ``linger_s`` to leave, then close."""
        if self._closing:
            await self._closed.wait()
            return
        self.close_reason = reason
        self.notify_closing(reason, detail)
        if linger_s > 0 and self._channel is not None:
            await asyncio.sleep(linger_s)
        await self.aclose(reason)

    # --- incoming media -------------------------------------------------------------------
    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            set_audio_prefetch(self.pc, track, self.settings.webrtc.mic_prefetch_frames)
            if self.conversation.listening:  # decoded on the mic thread, not aiortc's
                tap_microphone(self.pc, track, feed=self.conversation.feed_later,
                               stats=self.mic, heard=self._heard, now_ns=self.clock.now_ns)
        self._spawn(self._drain(track), f"drain-{track.kind}")

    def _heard(self) -> None:
        self.last_media = self._now()

    async def _drain(self, track: MediaStreamTrack) -> None:
        """Always consume what the peer sends; audio feeds the microphone level."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.last_media = self._now()
            if track.kind == "audio":  # (none where tap_microphone took them)
                self.mic.observe(frame_power(frame))  # type: ignore[arg-type]
                self.conversation.feed(frame)  # type: ignore[arg-type]

    # --- control channel ------------------------------------------------------------------
    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != "control":
            return
        self._channel = channel
        channel.on("message", self._on_message)
        media = self.settings.media
        self.send_event(Hello(self.id, self.avatar.avatar_id, media.fps, media.video_width,
                              media.video_height, media.audio_sample_rate))

    def _on_media_event(self, event: dict[str, object]) -> None:
        """The compositor's events: a segment starting to play (the assistant's line goes
        out with its audio, never ahead of the mouth) and speaking/listening changes."""
        kind = event.get("type")
        if kind == "playout":
            text = event.get("text")
            if event.get("kind") == "speech" and isinstance(text, str) and text:
                self.send_event(Transcript("assistant", text))
            self.conversation.on_playout(event.get("tag"))
        elif kind == "state" and event.get("state") in ("speaking", "listening"):
            self.send_event(State("speaking" if event["state"] == "speaking" else "listening"))
        else:
            logger.warning("session %s: unknown compositor event %s", self.id[:8], short(kind))

    # --- what the conversation drives -------------------------------------------------------
    def schedule(self, segment: Segment) -> None:
        self.compositor.schedule(segment)

    async def wait_for_speech_room(self) -> None:
        await self.compositor.wait_until_ahead_at_most(SPEECH_AHEAD_NS)

    def duck(self, on: bool) -> None:
        self.compositor.duck(on)

    @property
    def playing(self) -> bool:
        return self.compositor.speaking or self.compositor.queued > 0

    def send_event(self, event: Event) -> None:
        if isinstance(event, State) and self.expression is not None:
            self.expression.state(event.state, event.user)  # thinking, back to listening
        payload = event.to_wire()
        if self._on_event is not None:
            self._on_event(self, payload)
        ch = self._channel
        if ch is not None and ch.readyState == "open":
            try:
                ch.send(json.dumps(payload))
            except Exception as exc:  # noqa: BLE001 - a failed send never ends the call
                logger.warning("session %s: could not send a %s event: %s", self.id[:8],
                               event.type, exc)

    def _lipsync_failed(self, where: str, exc: BaseException) -> None:
        """The lip-sync engine failed in ``where`` ("analyse" or "render"); may be called from
        a worker thread. The call goes on with the fallback engine."""
        fallback = self.lipsync.name
        detail = f"the lip-sync engine failed ({where}: {exc or type(exc).__name__})"
        logger.error(
            "session %s: %s; switching to %s",
            self.id[:8],
            detail,
            fallback,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        event = Error(f"{detail}; going on with the {fallback} engine", stage="lipsync")
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self.send_event, event)

    def _lipsync_degraded(self, degraded: bool) -> None:
        """The configured engine missed its frame deadlines and the fallback draws the rest of
        the utterance (``degraded``), or it is back; on the loop (the renderer's caller)."""
        engine = self.lipsync.fallback if degraded else self.lipsync.primary
        assert engine is not None  # a degrade needs a fallback
        logger.warning("session %s: lip-sync %s (%s)", self.id[:8],
                       f"degraded to {engine.name}" if degraded else f"back to {engine.name}",
                       "frame deadlines missed or its pool away" if degraded
                       else "no frame missed for 2 s")
        guard = self.lipsync.guard
        reason = (guard.reason if guard is not None else "deadlines_missed") if degraded \
            else "headroom_back"
        self.send_event(LipSync(engine.name, degraded, reason))

    def _error(self, message: str, *, fatal: bool = False) -> None:
        self.send_event(Error(message, fatal=fatal))

    def _refuse(self, message: str, field: str | None = None) -> None:
        """A control message was refused: an error event (stage ``control``) naming the field;
        the call goes on."""
        self.send_event(Error(message, stage="control", field=field))

    def _on_message(self, raw: object) -> None:
        """One control message. Whatever it holds, it never ends the call: a bad message is
        refused with an error event, and a failure in handling it is logged and reported."""
        self.heard()
        try:
            self._handle_message(raw)
        except Exception:  # noqa: BLE001 - a server bug must not close the peer connection
            logger.exception("session %s: handling a control message failed", self.id[:8])
            with contextlib.suppress(Exception):
                self._error("the server failed to handle that message")

    def _handle_message(self, raw: object) -> None:
        msg = parse_control(raw, max_json_depth=self.settings.server.max_json_depth,
                            max_chat_chars=self.settings.conversation.max_chat_chars)
        if isinstance(msg, Refused):
            self._refuse(msg.message, msg.field)
        elif isinstance(msg, Say):
            try:
                self._says.put_nowait(msg.text)
            except asyncio.QueueFull:
                self._refuse(f"too many queued says (max {MAX_QUEUED_SAYS})")
        elif isinstance(msg, Chat):
            self.conversation.chat(msg.text)
        elif isinstance(msg, Interrupt):
            self.interrupt()
        elif isinstance(msg, Clapper):
            if self._clapper is not None or self.compositor.pending_of("clapper"):
                self._refuse("a clapper is already playing (one at a time; interrupt ends it)")
            else:
                self._clapper = self._spawn(self.play_clapper(msg.count), "clapper")

    async def play_clapper(self, count: int) -> None:
        """Schedule an A/V sync test of ``count`` beeps; its audio (up to 58 MB for 600 s)
        is built off the event loop."""
        media = self.settings.media
        build = functools.partial(clapper_pcm, count=count, fps=media.fps,
                                  sample_rate=media.audio_sample_rate)
        try:
            pcm = await asyncio.get_running_loop().run_in_executor(self._render_executor, build)
        finally:
            self._clapper = None
        self.compositor.schedule(
            Segment(
                pcm=pcm,
                mouth=np.zeros(0, np.float32),
                kind="clapper",
                flash_frames=frozenset(flash_frames(count, media.fps)),
            )
        )

    def interrupt(self) -> int:
        """Stop speaking now: queued says are dropped, synthesis in progress is cancelled, and
        the compositor cuts speech at the next frame boundary and fades to idle. Returns the
        video frame index where speech stops."""
        dropped = 0
        while not self._says.empty():
            self._says.get_nowait()
            dropped += 1
        if self._say_job is not None and not self._say_job.done():
            self._say_job.cancel()
        if self._clapper is not None:
            self._clapper.cancel()
        self.conversation.interrupt()
        frame = self.compositor.clear()
        logger.info(
            "session %s interrupted at frame %d (%d says dropped)", self.id[:8], frame, dropped
        )
        return frame

    async def _say_worker(self) -> None:
        while True:
            text = await self._says.get()
            job = self._spawn(self._speak(text), "speak")
            self._say_job = job
            await asyncio.wait({job})  # an interrupt cancels the job, not this worker

    async def _speak(self, text: str) -> None:
        try:
            await self.speaker.speak(text, schedule=self.compositor.schedule,
                                     room=self.wait_for_speech_room)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("speech synthesis failed")
            self._error(f"speech synthesis failed: {exc}")

    # --- reporting ------------------------------------------------------------------------
    def describe(self) -> dict[str, object]:
        """What GET /sessions shows of this call (``rtc_server.session_info``)."""
        return describe_session(self)

    @property
    def pending_says(self) -> int:
        """Say messages waiting to be spoken."""
        return self._says.qsize()
