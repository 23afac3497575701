"""Rendering one clip: text or audio in; video, audio files and the animation timeline out.

The same parts as a call: Piper speech (or the decoded upload), the server's lip-sync engine
(``LipSyncEngine.analyse`` per segment, then its renderer), the compositor's frame plans
(segments back to back on video-frame boundaries) and an ``IdleTimeline`` seeded from the
spec's cache key, so blinks, glances and breathing go on and the same request renders the
same face. Video frame ``k`` shows media time ``k / fps`` s and covers audio samples
``[k*sr//fps, (k+1)*sr//fps)``; the clip has ``ceil(samples * fps / sr)`` frames.

``ClipRenderer.render`` is blocking: it runs a private event loop in the calling thread,
keeps several frames in flight on a thread pool (engines that batch, like Wav2Lip, see them
together) and encodes on a second thread as frames arrive in order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from common.errors import BadRequest, PipelineError
from face import IdleTimeline
from media_tracks.clock import ManualClock
from media_tracks.compositor import Compositor, Scheduled, Segment
from media_tracks.expressive import CallExpression
from media_tracks.priority import RENDER_JOB_NICE, background_thread
from pipeline.lipsync.visemes import VisemeTrack, track_for
from pipeline.render.media import (
    ClipEncoder,
    DecodeCancelled,
    Pcm,
    change_tempo,
    decode_audio,
    video_options,
    write_ogg_opus,
    write_wav,
)
from pipeline.render.spec import (
    AUDIO_OGG_FILE,
    AUDIO_WAV_FILE,
    FORMATS,
    MAX_SPEED,
    MIN_SPEED,
    TIMELINE_FILE,
    RenderSpec,
)
from pipeline.render.timeline import build_timeline, idle_seed, mouth_cues
from pipeline.tts import PiperTTS, SpeechAudio, TextToSpeech, speech_stream

if TYPE_CHECKING:
    from config import Settings
    from face.library import AvatarLibrary, LoadedAvatar
    from pipeline.lipsync.base import LipSyncEngine, LipTrack

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]  # (percent 0..100, stage name)
_T = TypeVar("_T")

# Bumped whenever the same spec would render differently (part of ``identity()``).
RENDER_VERSION = 1
DEFAULT_VOICE = "default"
# Uploaded audio is analysed in pieces of at most this long, cut at the quietest video-frame
# boundary of the last quarter (bounds the memory of the spectral analysis).
MAX_SEGMENT_S = 20.0
# Share of the progress bar per stage: speech, analysis, frames (render + encode), files.
_SPEECH_END, _ANALYSIS_END, _FRAMES_END = 10.0, 15.0, 95.0
_SENTENCE_END = re.compile(r"[.!?;:\u2026\u061f]+(?:\s|$)")


class RenderCancelled(Exception):
    """The render's cancel event was set; the files written so far are removed."""


class _Reporter:
    """Forwards progress monotonically, at most once per 0.5 % within a stage."""

    def __init__(self, progress: Progress, cancel: threading.Event) -> None:
        self._progress = progress
        self.cancel = cancel
        self._stage = ""
        self._last = -1.0

    def __call__(self, percent: float, stage: str) -> None:
        percent = round(min(100.0, max(self._last, percent, 0.0)), 2)
        if stage == self._stage and percent - self._last < 0.5 and percent < 100.0:
            return
        self._stage, self._last = stage, percent
        self._progress(percent, stage)

    def check(self) -> None:
        if self.cancel.is_set():
            raise RenderCancelled("render cancelled")


class ClipRenderer:
    """Holds the loaded resources of one process (avatars library, TTS voices, lip-sync
    engine) and renders clips with them; ``render`` may run in several threads at once."""

    def __init__(
        self,
        settings: Settings,
        *,
        library: AvatarLibrary,
        lipsync: LipSyncEngine,
        tts: TextToSpeech | None = None,
        voices: Mapping[str, TextToSpeech] | None = None,
        executor: Executor | None = None,
        window: int | None = None,
    ) -> None:
        """``tts`` is the "default" voice (None: the configured Piper voice, loaded on first
        use); ``voices`` adds more by name. ``executor`` runs the renderer's frame work
        (None: a pool of one thread per CPU, at least 2, owned by this object); ``window`` is
        how many frames are in flight at once (None: 4 per render thread)."""
        self.settings = settings
        self.library = library
        self.lipsync = lipsync
        if tts is None:
            path = settings.engines.piper_voice
            tts = PiperTTS(
                voice_path=Path(path).expanduser() if path else None,
                sample_rate=settings.media.audio_sample_rate,
            )
        self._voices: dict[str, TextToSpeech] = {DEFAULT_VOICE: tts, **(voices or {})}
        threads = max(2, os.cpu_count() or 2)
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            threads, thread_name_prefix="clip-render", initializer=background_thread,
            initargs=(RENDER_JOB_NICE,),
        )
        self._window = window or 4 * threads
        self._owns_lipsync = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ClipRenderer:
        """Everything from the configuration (blocking: loads the Piper voice, the lip-sync
        engine and the default avatar). Raises what the server would at start-up."""
        import cv2

        from face.library import AvatarLibrary
        from pipeline.lipsync import create_lipsync_engine

        cv2.setNumThreads(1)  # frames render on our pool; OpenCV's own threads only compete
        media = settings.media
        library = AvatarLibrary(
            data_dir=Path(settings.avatars.data_dir),
            width=media.video_width,
            height=media.video_height,
        )
        library.get(settings.avatars.default)
        path = settings.engines.piper_voice
        tts = PiperTTS(
            voice_path=Path(path).expanduser() if path else None,
            sample_rate=media.audio_sample_rate,
        )
        tts.load()
        lipsync = create_lipsync_engine(settings)
        renderer = cls(settings, library=library, lipsync=lipsync, tts=tts)
        renderer._owns_lipsync = True
        return renderer

    def voices(self) -> list[str]:
        """Names accepted in ``RenderSpec.voice``."""
        return list(self._voices)

    def identity(self) -> dict[str, object]:
        """What, besides the spec and the avatar's content, changes the output: for the
        cache key."""
        info = self.lipsync.info()
        media, render = self.settings.media, self.settings.render
        return {
            "render_version": RENDER_VERSION,
            "engine": self.lipsync.name,
            "model": info.get("model"),
            "precision": info.get("precision"),
            "voices": {
                name: getattr(tts, "voice_name", type(tts).__name__)
                for name, tts in self._voices.items()
            },
            "width": media.video_width,
            "height": media.video_height,
            "sample_rate": media.audio_sample_rate,
            "h264": [render.h264_preset, render.h264_crf],
            "vp9_crf": render.vp9_crf,
        }

    def close(self) -> None:
        """Release the pool and, when ``from_settings`` loaded it, the lip-sync engine."""
        if self._own_executor and isinstance(self._executor, ThreadPoolExecutor):
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self._owns_lipsync:
            asyncio.run(self.lipsync.aclose())
            self._owns_lipsync = False

    # --------------------------------------------------------------------------- render

    def render(
        self,
        spec: RenderSpec,
        out_dir: Path,
        progress: Progress,
        cancel: threading.Event,
    ) -> dict[str, object]:
        """Blocking. Writes into ``out_dir`` (which exists and is empty): video.mp4 or
        video.webm, audio.ogg, audio.wav, timeline.json, and returns the manifest
        ``{"files": {"video", "audio_ogg", "audio_wav", "timeline"}, "duration_s", "frames",
        "fps", "format", "width", "height", "engine", "voice", ...}``.

        Checks ``cancel`` at least once per frame and raises ``RenderCancelled`` when it is
        set; raises ``BadRequest`` for content it cannot render (unknown voice, audio that
        is not audio or too long, text that is empty), ``NotFound`` for an unknown avatar.
        On any failure the files it wrote are removed."""
        out_dir = Path(out_dir)
        self._check(spec)
        reporter = _Reporter(progress, cancel)
        written = [out_dir / spec.video_file] + [
            out_dir / n for n in (AUDIO_OGG_FILE, AUDIO_WAV_FILE, TIMELINE_FILE)
        ]
        try:
            return asyncio.run(self._render(spec, out_dir, reporter))
        except DecodeCancelled:
            self._remove(written)
            raise RenderCancelled("render cancelled") from None
        except BaseException:
            self._remove(written)
            raise

    @staticmethod
    def _remove(paths: list[Path]) -> None:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                logger.warning("could not remove %s", path)

    def _check(self, spec: RenderSpec) -> None:
        if spec.voice not in self._voices:
            known = ", ".join(sorted(self._voices))
            raise BadRequest(f"unknown voice {spec.voice!r}; known voices: {known}")
        if spec.format not in FORMATS:
            raise BadRequest(f"format must be one of {', '.join(FORMATS)}; got {spec.format!r}")
        if not (math.isfinite(spec.speed) and MIN_SPEED <= spec.speed <= MAX_SPEED):
            raise BadRequest(f"speed must be in {MIN_SPEED}..{MAX_SPEED}, got {spec.speed:g}")
        lo, hi = self.settings.render.min_fps, self.settings.render.max_fps
        if not lo <= spec.fps <= hi:
            raise BadRequest(f"fps must be in {lo}..{hi}, got {spec.fps}")
        if (spec.text is None) == (spec.audio_path is None):
            raise BadRequest("a render needs exactly one of text and audio")
        if spec.text is not None:
            if not spec.text.strip():
                raise BadRequest("the text is empty")
            limit = self.settings.render.max_text_chars
            if len(spec.text) > limit:
                raise BadRequest(f"the text is over {limit} characters ({len(spec.text)})")

    async def _run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def _render(
        self, spec: RenderSpec, out_dir: Path, report: _Reporter
    ) -> dict[str, object]:
        t0 = time.perf_counter()
        sr = self.settings.media.audio_sample_rate
        fps = spec.fps
        avatar = await self._run(self.library.get, spec.avatar_id)
        report.check()

        # 1. speech: synthesised sentences, or the decoded upload in pieces
        if spec.text is not None:
            report(0.0, "synthesising")
            speech = await self._synthesise(spec, report)
        else:
            report(0.0, "decoding")
            speech = await self._decode(spec, report)
        if not speech or sum(len(s.pcm) for s in speech) == 0:
            raise BadRequest("the text gives no speech to render")
        t_speech = time.perf_counter()

        # 2. analysis: the engine's features per segment, viseme cues for the timeline
        report(_SPEECH_END, "analysing")
        tracks: list[LipTrack] = []
        cues_tracks: list[VisemeTrack] = []
        for seg in speech:
            report.check()
            track = await self._run(self.lipsync.analyse, seg, fps=fps)
            tracks.append(track)
            if isinstance(track, VisemeTrack):
                cues_tracks.append(track)
            else:
                cues_tracks.append(await self._run(track_for, seg, fps))
        t_analysis = time.perf_counter()

        # 3. the schedule: segments back to back on frame boundaries, as in a call
        compositor = Compositor(
            clock=ManualClock(),
            fps=fps,
            sample_rate=sr,
            schedule_lead_ms=0,
            crossfade_frames=self.settings.media.crossfade_frames,
        )
        expression = self.settings.expression
        # the head follows the voice's stress, as in a call (no listening in a clip)
        expressive = None if not expression.enabled or expression.strength <= 0 else (
            CallExpression(compositor, strength=expression.strength, lead_ns=0))
        scheduled: list[Scheduled] = [
            compositor.schedule(
                Segment(pcm=seg.pcm, mouth=track.openness(), lips=track, text=seg.text)
            )
            for seg, track in zip(speech, tracks, strict=True)
        ]
        # a clip speaks from its first frame to its last: no idle face to fade from or to
        scheduled[0].fade_in = False
        scheduled[-1].fade_out = False
        n_samples = scheduled[-1].end
        pcm = np.zeros(n_samples, dtype=np.int16)
        for item in scheduled:
            pcm[item.start : item.start + len(item.segment.pcm)] = item.segment.pcm
        n_frames = max(1, -(-n_samples * fps // sr))
        idle = IdleTimeline(seed=idle_seed(spec.cache_key or json.dumps(spec.to_dict())))
        if expressive is not None:
            idle = expressive.timeline(idle)

        # 4. frames, rendered ahead and encoded in order
        report(_ANALYSIS_END, "rendering")
        width, height = avatar.avatar.size
        timings = await self._frames(
            spec, out_dir, avatar, idle, compositor, pcm, n_frames, (width, height), report
        )

        # 5. audio files and the timeline
        report(_FRAMES_END, "encoding")
        report.check()
        t_files = time.perf_counter()
        await self._run(write_ogg_opus, out_dir / AUDIO_OGG_FILE, pcm, sr)
        report.check()
        await self._run(write_wav, out_dir / AUDIO_WAV_FILE, pcm, sr)
        cues = mouth_cues(
            ((item.start, t.cues) for item, t in zip(scheduled, cues_tracks, strict=True)),
            sample_rate=sr,
        )
        timeline = build_timeline(
            fps=fps, sample_rate=sr, n_samples=n_samples, cues=cues, idle=idle
        )
        eyes = timeline["eye_events"]
        assert isinstance(eyes, list)
        text = json.dumps(timeline, separators=(",", ":"))
        await self._run((out_dir / TIMELINE_FILE).write_text, text, encoding="utf-8")
        t_end = time.perf_counter()
        report(100.0, "finishing")
        return {
            "files": {
                "video": spec.video_file,
                "audio_ogg": AUDIO_OGG_FILE,
                "audio_wav": AUDIO_WAV_FILE,
                "timeline": TIMELINE_FILE,
            },
            "duration_s": round(n_samples / sr, 3),
            "frames": n_frames,
            "fps": fps,
            "format": spec.format,
            "width": width,
            "height": height,
            "engine": self.lipsync.name,
            "voice": spec.voice,
            "avatar_id": spec.avatar_id,
            "speed": spec.speed,
            "input": "text" if spec.text is not None else "audio",
            "sample_rate": sr,
            "audio_samples": n_samples,
            "mouth_cues": len(cues),
            "eye_events": len(eyes),
            "timings_s": {
                "speech": round(t_speech - t0, 3),
                "analysis": round(t_analysis - t_speech, 3),
                "render": round(timings["render"], 3),
                "encode": round(timings["encode"] + t_end - t_files, 3),
                "total": round(t_end - t0, 3),
            },
        }

    async def _synthesise(self, spec: RenderSpec, report: _Reporter) -> list[SpeechAudio]:
        assert spec.text is not None
        tts = self._voices[spec.voice]
        text = spec.text.strip()
        expected = max(1, len(_SENTENCE_END.findall(text)))
        out: list[SpeechAudio] = []
        # a render job's synthesis: after the live calls', in turn with other renders'
        speed = spec.speed if isinstance(tts, PiperTTS) else None
        owner = f"render-{id(report):x}"  # this render's (a key that holds nothing alive)
        stream = speech_stream(tts, text, owner=owner, live=False, speed=speed)
        async for sentence in stream:
            report.check()
            if spec.speed != 1.0 and not isinstance(tts, PiperTTS):
                sentence = await self._run(_retime, sentence, spec.speed)
            if sentence.sample_rate != self.settings.media.audio_sample_rate:
                raise PipelineError(
                    f"voice {spec.voice!r} gives {sentence.sample_rate} Hz audio, not "
                    f"{self.settings.media.audio_sample_rate}"
                )
            if len(sentence.pcm):
                out.append(sentence)
            report(_SPEECH_END * min(1.0, len(out) / expected), "synthesising")
        return out

    async def _decode(self, spec: RenderSpec, report: _Reporter) -> list[SpeechAudio]:
        assert spec.audio_path is not None
        sr = self.settings.media.audio_sample_rate
        pcm = await self._run(
            decode_audio,
            Path(spec.audio_path),
            sample_rate=sr,
            max_seconds=self.settings.render.max_audio_s,
            cancel=report.cancel,
        )
        report.check()
        if spec.speed != 1.0:
            pcm = await self._run(change_tempo, pcm, sr, spec.speed)
        report(_SPEECH_END * 0.8, "decoding")
        bounds = split_points(pcm, sr, spec.fps, max_s=MAX_SEGMENT_S)
        return [
            SpeechAudio(text="", pcm=pcm[a:b], sample_rate=sr)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    async def _frames(
        self,
        spec: RenderSpec,
        out_dir: Path,
        avatar: LoadedAvatar,
        idle: IdleTimeline,
        compositor: Compositor,
        pcm: Pcm,
        n_frames: int,
        size: tuple[int, int],
        report: _Reporter,
    ) -> dict[str, float]:
        """Render and encode every frame; returns seconds spent waiting for frames
        ("render") and in the encoder ("encode")."""
        loop = asyncio.get_running_loop()
        width, height = size
        renderer = self.lipsync.renderer(
            avatar, idle, width=width, height=height, executor=self._executor
        )
        render = self.settings.render
        encoder_pool = ThreadPoolExecutor(1, thread_name_prefix="clip-encode")
        encoder: ClipEncoder | None = None
        pending: dict[int, asyncio.Task[Any]] = {}
        wait_s = encode_s = 0.0
        try:
            encoder = await loop.run_in_executor(
                encoder_pool,
                lambda: ClipEncoder(
                    out_dir / spec.video_file,
                    fmt=spec.format,
                    width=width,
                    height=height,
                    fps=spec.fps,
                    pcm=pcm,
                    sample_rate=self.settings.media.audio_sample_rate,
                    options=video_options(
                        spec.format,
                        h264_preset=render.h264_preset,
                        h264_crf=render.h264_crf,
                        vp9_crf=render.vp9_crf,
                    ),
                ),
            )
            ahead = 0
            span = _FRAMES_END - _ANALYSIS_END
            for k in range(n_frames):
                while ahead < n_frames and ahead < k + self._window:
                    report.check()
                    plan = compositor.frame_plan(ahead)
                    pending[ahead] = loop.create_task(renderer.render(plan))
                    ahead += 1
                t = time.perf_counter()
                frame = await pending.pop(k)
                t1 = time.perf_counter()
                report.check()
                await loop.run_in_executor(encoder_pool, encoder.add_frame, frame)
                t2 = time.perf_counter()
                wait_s += t1 - t
                encode_s += t2 - t1
                report(_ANALYSIS_END + span * (k + 1) / n_frames, "rendering")
            report.check()
            t = time.perf_counter()
            await loop.run_in_executor(encoder_pool, encoder.close)
            encode_s += time.perf_counter() - t
            return {"render": wait_s, "encode": encode_s}
        except BaseException:
            for task in pending.values():
                task.cancel()
            await asyncio.gather(*pending.values(), return_exceptions=True)
            if encoder is not None:
                await loop.run_in_executor(encoder_pool, encoder.abort)
            raise
        finally:
            encoder_pool.shutdown(wait=True)


def _retime(audio: SpeechAudio, speed: float) -> SpeechAudio:
    """A sentence from a voice without its own rate control, sped up by ``atempo``; phoneme
    durations scale with it."""
    pcm = change_tempo(audio.pcm, audio.sample_rate, speed)
    scale = len(pcm) / max(1, len(audio.pcm))
    phonemes = tuple((ph, int(round(n * scale))) for ph, n in audio.phonemes)
    return SpeechAudio(text=audio.text, pcm=pcm, sample_rate=audio.sample_rate, phonemes=phonemes)


def split_points(pcm: Pcm, sample_rate: int, fps: int, *, max_s: float) -> list[int]:
    """Sample positions ``[0, ..., len(pcm)]`` cutting ``pcm`` into pieces of at most
    ``max_s`` seconds, each cut on a video-frame boundary (``k * sr // fps``) at the quietest
    frame of the last quarter of the piece."""
    n = len(pcm)
    max_frames = max(2, int(max_s * fps))
    bounds = [0]
    first = 0  # frame where the current piece starts
    while n - first * sample_rate // fps > max_frames * sample_rate // fps:
        lo = first + max_frames - max_frames // 4
        hi = first + max_frames
        best, best_energy = hi, math.inf
        for k in range(lo, hi + 1):
            a = (k - 1) * sample_rate // fps
            b = (k + 1) * sample_rate // fps
            window = pcm[a:b].astype(np.float32)
            energy = float(np.mean(window * window)) if window.size else 0.0
            if energy < best_energy:
                best, best_energy = k, energy
        bounds.append(best * sample_rate // fps)
        first = best
    bounds.append(n)
    return bounds
