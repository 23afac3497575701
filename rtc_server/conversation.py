"""The spoken conversation of one session: microphone -> VAD -> Whisper -> replier -> Piper ->
lip-sync -> compositor, with barge-in.

- Listening: every incoming audio frame is resampled to 16 kHz mono and run through the Silero
  VAD with endpointing, off the event loop, in arrival order.
- A turn starts at the end of an utterance (or a chat message): transcription, then the reply
  stream, cut into sentences as it arrives; each sentence is synthesised and handed to the
  lip-sync engine while the next one is still being written, so the avatar starts speaking
  after the first sentence.
- Preemptive answers (``conversation.preemptive``): at a pause in the person's speech the
  turn starts at once (transcription, reply, synthesis) but is held: nothing is sent or
  scheduled until the end of the turn is confirmed; speech resuming throws it away.
- Barge-in: confirmed speech (longer than ``vad.min_speech_ms``) while the avatar thinks or
  speaks cancels the turn (reply stream, synthesis) and interrupts playout at the next frame.
- Events: the user's transcript, the assistant's text when its audio starts playing (never
  ahead of the mouth), ``thinking`` while a turn has nothing playing yet, per-turn metrics,
  errors (fatal after ``llm.max_consecutive_failures`` failed replies in a row).
- Failures never end the call: a failed transcription is an error event and listening goes
  on; a failed reply (error, timeout) is an error event and the avatar speaks
  ``conversation.apology``; a sentence that fails to synthesise is an error event and the
  turn goes on with the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from common.threads import name_os_thread
from pipeline.sentences import SentenceSplitter
from pipeline.speaking import FirstAudio, Speaker
from pipeline.turns import TurnDetector, stt_language
from rtc_server.protocol import Error, Event, Metrics, State, Transcript, with_turn
from rtc_server.turn_end import EndOfTurn

if TYPE_CHECKING:
    from av import AudioFrame

    from config import Settings
    from media_tracks.compositor import Segment
    from pipeline.replier import Replier
    from pipeline.stt import Transcript as SttTranscript

logger = logging.getLogger(__name__)

# microphone frames queued for the mic thread at most (50 x 20 ms: a second); more are dropped
MAX_MIC_BACKLOG = 50


class SpeechToText(Protocol):
    async def transcribe(self, audio16k: np.ndarray) -> SttTranscript: ...


class Host(Protocol):
    """What the conversation needs from its session."""

    id: str

    def send_event(self, event: Event) -> None: ...

    def schedule(self, segment: Segment) -> None: ...

    def interrupt(self) -> object:
        """Stop the playout now (at the next frame boundary)."""
        ...

    @property
    def playing(self) -> bool: ...

    def duck(self, on: bool) -> None:
        """Fade the avatar's voice out (on) or back in, its speech going on underneath."""
        ...

    async def wait_for_speech_room(self) -> None:
        """Return once little enough speech is scheduled ahead of playback that the next
        sentence should be made (synthesis paced by playback, not one CPU burst)."""
        ...


@dataclass(slots=True)
class Turn:
    """One answer. A preemptive turn is not ``committed`` yet: what it would send or schedule
    is ``held`` until the end of the person's speech is confirmed (or thrown away). Its
    ``number`` (shown to the client) is given when it is committed; ``key`` tags its speech."""

    key: int
    started: float  # the conversation's clock when the user's speech ended (or chat arrived)
    source: str  # "voice" | "chat"
    number: int = 0
    committed: bool = True
    held: list[Callable[[], None]] = field(default_factory=list)
    user_text: str = ""
    reply: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    first_audio_scheduled: bool = False
    reported: bool = False
    pause_end_ms: int | None = None  # the pause (mic ms) a preemptive turn started at
    end_rule: str | None = None  # what ended the person's turn (pipeline.turns)

    def when_committed(self, action: Callable[[], None]) -> None:
        if self.committed:
            action()
        else:
            self.held.append(action)

    def commit(self, number: int) -> None:
        self.number, self.committed = number, True
        held, self.held = self.held, []
        for action in held:
            action()


# the VAD's events as cues for the face (media_tracks.expressive)
VAD_CUES = {"SpeechStart": "user_start", "SpeechPause": "user_pause", "SpeechEnd": "user_end"}


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


class Conversation:
    def __init__(
        self,
        host: Host,
        *,
        settings: Settings,
        speaker: Speaker,
        replier: Replier,
        stt: SpeechToText | None,
        listener: Any | None,
        resampler: Any | None,
        on_speech: Callable[[], None] | None = None,
        on_cue: Callable[[str], None] | None = None,
        turn_detector: TurnDetector | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        """``speaker``: the call's one speaking path (text -> TTS -> lip-sync -> schedule).
        ``on_speech``: called at every speech start the VAD hears (the session's idle
        timeout). ``on_cue(kind)``: the person's speech as the face shows it
        (``user_start``, ``user_pause``, ``user_end``; ``media_tracks.expressive``).
        ``now``: seconds of a monotonic clock, for the turn metrics (tests pass a fake and
        drive turns without sleeping)."""
        self._host = host
        self._on_speech = on_speech
        self._on_cue = on_cue
        self._remembered: int | None = None  # the last turn put in the history
        self._settings = settings
        self.speaker = speaker
        self._replier = replier
        self._stt = stt
        self._listener = listener
        self._resampler = resampler
        self._now = now
        # VAD chunks must run in order: one thread per session for the mic path
        self._mic_pool = ThreadPoolExecutor(
            1, thread_name_prefix=f"mic-{host.id[:6]}", initializer=name_os_thread
        )
        # when the person's turn ends (rtc_server.turn_end; the detector runs on the mic
        # thread); without a detector: the VAD's fixed silence
        self._eot = EndOfTurn(turn_detector, listener, fixed_ms=settings.vad.end_silence_ms,
                              executor=self._mic_pool, language=lambda: stt_language(settings))
        self._mic_submitted = 0
        self._mic_done = 0
        self.mic_frames_dropped = 0  # the mic thread was MAX_MIC_BACKLOG frames behind
        self._turn_task: asyncio.Task[None] | None = None
        self._turn: Turn | None = None
        self._turns = 0  # turn numbers given (committed turns)
        self._keys = 0  # turn keys given (every turn, preemptive ones too)
        self.history: list[dict[str, str]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        # work started at a pause, kept if the end confirms it: (speech end ms, turn, task);
        # the turn is None for an early transcription only (conversation.preemptive false)
        self._speculative: tuple[int, Turn | None, asyncio.Task[Any]] | None = None
        self.barge_ins = 0
        self.ducks = 0  # the voice faded for a likely barge-in (SpeechOnset)
        self.ducks_released = 0  # ... that was not speech after all (SpeechBlip)
        self._ducked = False
        self.closed = False

    # --- lifecycle ------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{name}:{self._host.id[:8]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        self.closed = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # the mic thread finishes the frame it is on (a VAD chunk: about a millisecond); then
        # nothing uses the resampler, whose FFmpeg threads go with it now
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self._mic_pool.shutdown, wait=True, cancel_futures=True))
        if self._resampler is not None:
            self._resampler.close()
        # the replier is this call's own (an OpenAI client holds a connection pool): close it
        # now, not when the garbage collector finds it after the event loop is gone
        try:
            await self._replier.aclose()
        except Exception:  # noqa: BLE001 - closing must not fail the session's close
            logger.warning("closing the replier failed", exc_info=True)

    @property
    def busy(self) -> bool:
        """A turn is being answered (thinking or speaking)."""
        return self._turn_task is not None and not self._turn_task.done()

    # --- listening ------------------------------------------------------------------------
    @property
    def end_of_turn(self) -> EndOfTurn:
        """The call's end-of-turn decisions (``rtc_server.turn_end``)."""
        return self._eot

    @property
    def early_cut_ins(self) -> int:
        """Turns ended sooner than the fixed silence that the person went on with."""
        return self._eot.early_cut_ins

    @property
    def listening(self) -> bool:
        return self._listener is not None and self._stt is not None

    def feed(self, frame: AudioFrame) -> None:
        """One incoming microphone frame (called in arrival order by the session's drain).
        It goes to the session's one mic thread (resampling and VAD, in order) and nothing
        comes back to the event loop unless the VAD has news: no future, no wake-up per 20 ms
        frame (``_on_vad_events`` runs on the loop for the frames that end with events)."""
        self.feed_later(functools.partial(_one, frame))

    def feed_later(self, frames: Callable[[], list[AudioFrame]]) -> None:
        """Like ``feed``, for the frames ``frames()`` makes on the mic thread (the session's
        microphone tap decodes there: ``rtc_server.mic.tap_microphone``)."""
        if not self.listening or self.closed:
            return
        if self._mic_submitted - self._mic_done >= MAX_MIC_BACKLOG:
            # the mic thread is more than a second behind (a starved machine): hearing late
            # is worse than missing a frame
            self.mic_frames_dropped += 1
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError):  # the pool shut down: the call is closing
            self._mic_pool.submit(self._listen_and_report, frames, loop)
            self._mic_submitted += 1  # written on the loop only

    def _listen_and_report(self, frames: Callable[[], list[AudioFrame]],
                           loop: asyncio.AbstractEventLoop) -> None:
        try:
            events = [e for frame in frames() for e in self._listen(frame)]
        except Exception:  # one bad frame must not stop listening; it is logged
            logger.exception("session %s: the microphone frame could not be analysed",
                             self._host.id[:8])
            return
        finally:
            self._mic_done += 1  # written on the mic thread only
        if events and not self.closed:
            with contextlib.suppress(RuntimeError):  # the loop closed under us
                loop.call_soon_threadsafe(self._on_vad_events, events)

    def _on_vad_events(self, events: list[Any]) -> None:
        if self.closed:
            return
        for event in events:
            self._on_vad_event(event)

    def _listen(self, frame: AudioFrame) -> list[Any]:
        assert self._resampler is not None and self._listener is not None
        pcm = self._resampler.push(frame)
        if pcm.size == 0:
            return []
        return list(self._listener.feed(pcm))

    def _on_vad_event(self, event: Any) -> None:
        kind = type(event).__name__
        cue = VAD_CUES.get(kind)
        if cue is not None and self._on_cue is not None:
            self._on_cue(cue)
        if kind == "SpeechOnset":
            # perhaps the person talks over the avatar: its voice fades at once, and comes
            # back if the sound stops before it is sure to be speech (SpeechBlip)
            if self._settings.conversation.barge_in and (self.busy or self._host.playing):
                self._duck(True)
            return
        if kind == "SpeechBlip":
            if self._ducked:
                self.ducks_released += 1
                self._duck(False)
            return
        if kind == "SpeechStart":
            if self._on_speech is not None:
                self._on_speech()
            if self._eot.speech_started(int(event.onset_ms)):
                # the turn was ended too soon: its answer stops, the utterance goes on
                self._forget_last_turn()
                self.barge_in()
            elif self._settings.conversation.barge_in and (self.busy or self._host.playing):
                self.barge_in()
            self._duck(False)  # cut by the barge-in, or nothing was playing any more
            self._host.send_event(State("listening", user="speaking"))
        elif kind == "SpeechPause":
            # maybe the end of the turn: start on it now, keep the work if the end comes
            if self._stt is not None and not self.closed:
                self._cancel_speculation()
                end_ms = int(event.end_ms)
                audio = self._eot.audio_for(event.audio)
                if self._settings.conversation.preemptive:
                    turn = self._new_turn(self._speech_ended_at(event.end_ms), "voice")
                    turn.committed = False
                    turn.pause_end_ms = end_ms
                    task = self._spawn(self._voice_turn(turn, audio), "turn-preemptive")
                    self._speculative = (end_ms, turn, task)
                else:
                    task = self._spawn(self._early_transcript(end_ms, audio), "stt-early")
                    self._speculative = (end_ms, None, task)
        elif kind == "SpeechResume":
            self._cancel_speculation()
        elif kind == "SpeechEnd":
            self._on_speech_end(event)

    def _on_speech_end(self, event: Any) -> None:
        started = self._speech_ended_at(event.end_ms)
        audio = self._eot.audio_for(event.audio)
        joined = self._eot.joining
        self._eot.joined()
        decision = self._eot.ended(int(event.end_ms), audio)
        spec, self._speculative = self._speculative, None

        def measured(turn: Turn) -> Turn:
            turn.metrics["vad_end_ms"] = _ms(self._now() - started)
            turn.metrics["end_wait_ms"] = float(decision.wait_ms)
            turn.end_rule = decision.rule
            if joined:
                turn.metrics["joined"] = 1.0
            return turn

        if spec is not None and spec[0] == int(event.end_ms):
            _, early_turn, task = spec
            if early_turn is not None:  # preemptive: the held turn becomes the turn
                measured(early_turn).metrics["preemptive"] = 1.0
                self._adopt(early_turn, task)
                return
            turn = measured(self._new_turn(started, "voice"))
            self._start(turn, self._voice_turn(turn, audio, task))
            return
        if spec is not None:
            spec[2].cancel()
        turn = measured(self._new_turn(started, "voice"))
        self._start(turn, self._voice_turn(turn, audio))

    async def _early_transcript(self, end_ms: int, audio: np.ndarray) -> SttTranscript:
        """Transcribe at a pause (conversation.preemptive off), and choose the end silence."""
        assert self._stt is not None
        transcript = await self._stt.transcribe(audio)
        if transcript.text.strip():
            await self._eot.decide(end_ms, transcript.text, audio, transcript.language)
        return transcript

    def _speech_ended_at(self, end_ms: int) -> float:
        """self._now() when the speech ending at ``end_ms`` of mic-stream time (audio
        fed to the VAD) ended."""
        assert self._listener is not None
        behind_s = max(0.0, (self._listener.time_ms - float(end_ms)) / 1000.0)
        return self._now() - behind_s

    def _duck(self, on: bool) -> None:
        """The voice out of the person's way (on) or back (the compositor also ends a duck
        by itself after a second of media time, should the VAD never settle)."""
        if on == self._ducked:
            return
        self._ducked = on
        self.ducks += on
        self._host.duck(on)

    def _cancel_speculation(self) -> None:
        if self._speculative is not None:
            self._speculative[2].cancel()
            self._speculative = None

    def barge_in(self) -> None:
        """The person talks over the avatar: stop the turn and the playout at once."""
        self.barge_ins += 1
        self.interrupt()
        self._host.interrupt()
        logger.info("session %s: barge-in", self._host.id[:8])

    def interrupt(self) -> None:
        """Stop the current turn and any held (preemptive) one."""
        self._cancel_speculation()
        if self._turn_task is not None and not self._turn_task.done():
            self._turn_task.cancel()

    # --- turns ----------------------------------------------------------------------------
    def chat(self, text: str) -> None:
        """A typed message: straight to the replier (interrupting a reply in progress)."""
        if self.busy or self._host.playing:
            self.interrupt()
            self._host.interrupt()
        turn = self._new_turn(self._now(), "chat")
        turn.user_text = text
        self._start(turn, self._reply_turn(turn))
        self._emit(turn, Transcript("user", text, source="chat"))

    def _new_turn(self, started: float, source: str) -> Turn:
        self._keys += 1
        return Turn(key=self._keys, started=started, source=source)

    def _start(self, turn: Turn, coro: Coroutine[Any, Any, None]) -> None:
        """Make ``turn`` the current turn (replacing any other) and run ``coro`` for it."""
        self._adopt(turn, self._spawn(coro, "turn"))

    def _adopt(self, turn: Turn, task: asyncio.Task[Any]) -> None:
        self.interrupt()
        self._turns += 1
        self._turn, self._turn_task = turn, task
        turn.commit(self._turns)

    def _emit(self, turn: Turn, event: Event) -> None:
        """Send ``event`` for ``turn`` (held while the turn is preemptive); transcripts and
        metrics are labelled with the turn's number."""

        def send() -> None:
            self._host.send_event(with_turn(event, turn.number))

        turn.when_committed(send)

    async def _voice_turn(
        self, turn: Turn, audio: np.ndarray, early: asyncio.Task[Any] | None = None
    ) -> None:
        """``early``: a transcription of the same speech started at its pause; its result is
        used instead of transcribing again."""
        assert self._stt is not None
        self._emit(turn, State("thinking"))
        t0 = self._now()
        try:
            if early is not None:
                transcript = await early
                turn.metrics["stt_early"] = 1.0
            else:
                transcript = await self._stt.transcribe(audio)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("transcription failed")
            self._emit(turn, Error(f"transcription failed: {exc}", stage="stt"))
            self._emit(turn, State("listening"))
            return
        turn.metrics["stt_ms"] = _ms(self._now() - t0)
        text = transcript.text.strip()
        if not text:
            self._emit(turn, State("listening"))
            return
        turn.user_text = text
        if not turn.committed and turn.pause_end_ms is not None:
            # the transcript at the pause says how long a silence ends this turn
            await self._eot.decide(turn.pause_end_ms, text, audio, transcript.language)
        self._emit(turn, Transcript("user", text, source="voice", language=transcript.language))
        await self._reply_turn(turn)

    async def _reply_turn(self, turn: Turn) -> None:
        from pipeline.replier import ReplyError

        self._emit(turn, State("thinking"))
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        speaker = self._spawn(self._speak_reply(turn, sentences), "speaker")
        splitter = SentenceSplitter()
        language = self._settings.conversation.language
        t0 = self._now()
        ok = False
        apology = self._settings.conversation.apology.strip()
        try:
            stream = self._replier.reply(list(self.history), turn.user_text, language=language)
            try:
                async for delta in stream:
                    if "llm_first_token_ms" not in turn.metrics:
                        turn.metrics["llm_first_token_ms"] = _ms(self._now() - t0)
                    for sentence in splitter.feed(delta):
                        sentences.put_nowait(sentence)
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()  # type: ignore[attr-defined]
            for sentence in splitter.flush():
                sentences.put_nowait(sentence)
            ok = True
        except asyncio.CancelledError:
            speaker.cancel()
            raise
        except Exception as exc:  # a ReplyError (reported by the replier) or anything else
            if isinstance(exc, ReplyError):
                detail, fatal = exc.detail, bool(getattr(self._replier, "fatal", False))
            else:
                logger.exception("reply failed")
                detail, fatal = str(exc) or type(exc).__name__, False
            self._emit(turn, Error(f"the reply failed: {detail}", fatal=fatal, stage="llm"))
            if apology:  # said through the same voice and lip-sync, so no silence
                sentences.put_nowait(apology)
        finally:
            sentences.put_nowait(None)
        await speaker
        if ok and turn.reply:
            turn.when_committed(functools.partial(self._remember, turn))
        if not turn.first_audio_scheduled:
            self._emit(turn, State("listening"))

    def _remember(self, turn: Turn) -> None:
        self.history.append({"role": "user", "content": turn.user_text})
        self.history.append({"role": "assistant", "content": " ".join(turn.reply)})
        keep = 2 * max(self._settings.llm.history_turns, 1)
        del self.history[:-keep]
        self._remembered = turn.key

    def _forget_last_turn(self) -> None:
        """An early cut-in: the turn ended too soon is answered again, whole; what it said
        and heard leaves the history (no double answers)."""
        turn = self._turn
        if turn is not None and self._remembered == turn.key and len(self.history) >= 2:
            del self.history[-2:]
        self._remembered = None

    async def _speak_reply(self, turn: Turn, sentences: asyncio.Queue[str | None]) -> None:
        """Speak the reply's sentences as they come, through the call's one speaking path."""

        def first_audio(timing: FirstAudio) -> None:
            if not turn.first_audio_scheduled:
                turn.metrics["tts_first_audio_ms"] = timing.tts_ms
                turn.metrics["lipsync_first_frame_ms"] = timing.lipsync_ms
                turn.first_audio_scheduled = True

        def schedule(segment: Segment) -> None:
            turn.when_committed(functools.partial(self._host.schedule, segment))

        while (sentence := await sentences.get()) is not None:
            try:
                # the next piece is made when it is needed a few seconds from now (a held
                # turn schedules nothing yet, so it does not wait)
                await self.speaker.speak(
                    sentence, schedule=schedule, room=self._host.wait_for_speech_room,
                    tag=("turn", turn.key), on_first_audio=first_audio,
                    answer_start=not turn.reply,  # the answer's first words start sooner
                )
                turn.reply.append(sentence)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.exception("speech synthesis failed")
                self._emit(turn, Error(f"speech synthesis failed: {exc}", stage="tts"))

    # --- playout --------------------------------------------------------------------------
    def on_playout(self, tag: object) -> None:
        """A segment's first sample was handed to the audio track."""
        turn = self._turn
        if (
            turn is None
            or turn.reported
            or not isinstance(tag, tuple)
            or tag != ("turn", turn.key)
        ):
            return
        turn.reported = True
        turn.metrics["voice_to_voice_ms"] = _ms(self._now() - turn.started)
        self._emit(turn, Metrics(turn.source, dict(turn.metrics), end_rule=turn.end_rule))


def make_conversation_parts(settings: Settings, vad_model: Any) -> tuple[Any | None, Any | None]:
    """A per-session VAD listener and 48 kHz -> 16 kHz resampler (None when not listening)."""
    if vad_model is None or not settings.conversation.listen:
        return None, None
    from pipeline.vad import Listener, Resampler16k

    v = settings.vad
    listener = Listener(
        vad_model,
        threshold=v.threshold,
        neg_threshold=max(0.01, v.threshold - 0.15),
        # transcription starts at this much silence and is kept if the turn really ends
        pause_ms=min(v.pause_ms, v.end_silence_ms // 2),
        min_speech_ms=v.min_speech_ms,
        end_silence_ms=v.end_silence_ms,
        max_utterance_s=v.max_utterance_s,
        # a likely barge-in is told this soon (the voice fades until the VAD is sure)
        onset_ms=settings.conversation.barge_in_fade_ms or None,
        quiet_dbfs=v.quiet_dbfs if v.skip_quiet else None,
    )
    return listener, Resampler16k()


def _one(frame: AudioFrame) -> list[AudioFrame]:
    return [frame]
