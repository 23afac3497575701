"""Speech to text with the bundled Whisper models (tiny.en, multilingual base) on Piper speech."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import PipelineError
from pipeline.stt import Transcript, WhisperSTT, resolve_whisper_model
from tests.fakes.speech import piper_speech, with_silence

SENTENCE = "Hello, what is the weather like today?"


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]+", " ", text.lower()).split()


def word_match(said: str, heard: str) -> float:
    """Share of the words said that were heard, in order (longest common subsequence)."""
    a, b = words(said), words(heard)
    lcs = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if x == y else max(lcs[i][j + 1], lcs[i + 1][j])
    return lcs[-1][-1] / max(len(a), 1)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return with_silence(piper_speech(SENTENCE), 0.3, 0.6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WhisperSTT]:
    stt = WhisperSTT("tiny.en", cache_dir=tmp_path_factory.mktemp("stt"), device="cpu")
    stt.load()
    yield stt
    stt.close()


def test_tiny_en_transcribes_speech(tiny: WhisperSTT, speech: np.ndarray) -> None:
    result = tiny.transcribe_sync(speech)
    assert isinstance(result, Transcript)
    assert word_match(SENTENCE, result.text) >= 0.7, result.text
    assert result.language == "en"
    assert result.audio_s == pytest.approx(len(speech) / 16000)
    assert result.elapsed_s > 0
    info = tiny.info()
    assert info["device_in_use"] == "cpu" and tiny.device_in_use == "cpu"
    assert info["compute_type_in_use"].startswith("int8")  # CTranslate2 says int8_float32
    assert info["multilingual"] is False and info["loaded"] is True


async def test_transcribe_runs_off_the_event_loop(
    tiny: WhisperSTT, speech: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    model_transcribe = tiny._model.transcribe

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return model_transcribe(*args, **kwargs)

    monkeypatch.setattr(tiny._model, "transcribe", spy)
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)
    before = ticks
    result = await tiny.transcribe(speech)
    during = ticks - before
    beat.cancel()
    assert word_match(SENTENCE, result.text) >= 0.7, result.text
    assert threads and threads[0].startswith("whisper")  # its own worker thread
    assert threads[0] != threading.current_thread().name
    assert during >= 3  # the loop kept ticking while Whisper worked


def test_english_only_model_refuses_other_languages(tmp_path: Path) -> None:
    stt = WhisperSTT("tiny.en", cache_dir=tmp_path, language="fa")
    with pytest.raises(PipelineError, match="English-only"):
        stt.load()
    stt.close()


def test_missing_model_folder_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"stt\.model") as err:
        resolve_whisper_model(str(tmp_path / "no-such-model"), tmp_path)
    assert "tiny.en" in err.value.detail
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match=r"stt\.model"):
        resolve_whisper_model(str(tmp_path / "half"), tmp_path)


def test_a_model_folder_path_resolves_to_itself(tmp_path: Path) -> None:
    tiny_path = resolve_whisper_model("tiny.en", tmp_path)
    assert (tiny_path / "model.bin").is_file()
    assert resolve_whisper_model(str(tiny_path), tmp_path) == tiny_path


def test_base_is_joined_once_and_detects_english(tmp_path: Path, speech: np.ndarray) -> None:
    folder = resolve_whisper_model("base", tmp_path)
    assert folder == tmp_path / "whisper-base"
    model_bin = folder / "model.bin"
    mtime = model_bin.stat().st_mtime_ns
    assert resolve_whisper_model("base", tmp_path) == folder
    assert model_bin.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["whisper-base"]  # no temporary left over

    stt = WhisperSTT("base", cache_dir=tmp_path, device="cpu", language=None)
    stt.load()
    try:
        assert model_bin.stat().st_mtime_ns == mtime
        assert stt.info()["multilingual"] is True
        result = stt.transcribe_sync(speech)
        stt.window_s = 15.0  # the short window detects the language the same way
        short = stt.transcribe_sync(speech)
    finally:
        stt.close()
    assert word_match(SENTENCE, result.text) >= 0.7, result.text
    assert result.language == "en"
    assert result.language_probability > 0.5
    assert (stt.windowed, stt.rewindowed) == (1, 0)
    assert words(short.text) == words(result.text) and short.language == "en"
    assert short.language_probability > 0.5


def test_incomplete_base_folder_is_rebuilt(tmp_path: Path) -> None:
    broken = tmp_path / "whisper-base"
    broken.mkdir()
    for name in ("model.bin", "config.json", "tokenizer.json"):
        (broken / name).write_bytes(b"x")
    folder = resolve_whisper_model("base", tmp_path)
    assert folder == broken and (folder / "model.bin").stat().st_size > 100_000_000


# --- the short encoder window (stt.window_s) ------------------------------------------------
@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WhisperSTT]:
    stt = WhisperSTT("tiny.en", cache_dir=tmp_path_factory.mktemp("stt15"), device="cpu",
                     window_s=15.0)
    stt.load()
    yield stt
    stt.close()


@pytest.mark.parametrize(
    "text", [SENTENCE, "Why is the sky blue?", "My sister lives in a small town."])
def test_short_window_hears_what_the_full_window_hears(
    tiny: WhisperSTT, windowed: WhisperSTT, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    audio = with_silence(piper_speech(text), 0.2, 0.3)
    full = tiny.transcribe_sync(audio)
    before = (windowed.windowed, windowed.rewindowed)

    def not_the_full_window(*args, **kwargs):
        raise AssertionError("the 30 s path ran")

    monkeypatch.setattr(windowed._model, "transcribe", not_the_full_window)
    short = windowed.transcribe_sync(audio)
    assert (windowed.windowed, windowed.rewindowed) == (before[0] + 1, before[1])
    # Piper's voice differs a little from run to run, and either window may mishear a word of
    # it (bench.stt_window: 58 of 60 the same words, 4.5 % word errors against 5.3 %)
    assert word_match(text, short.text) >= 0.8, (short.text, full.text)
    assert word_match(full.text, short.text) >= 0.8, (short.text, full.text)
    assert short.language == "en" and 0.0 <= short.no_speech_prob < 0.5
    assert windowed.info()["window_s"] == 15.0


def test_an_utterance_near_the_window_uses_whisper_s_own(windowed: WhisperSTT,
                                                         speech: np.ndarray) -> None:
    long = np.concatenate([speech] * 6)[: int(14.5 * 16000)]  # 14.5 s: within 1 s of 15 s
    before = windowed.windowed
    result = windowed.transcribe_sync(long)
    assert windowed.windowed == before
    assert word_match(SENTENCE, result.text) >= 0.7


def test_a_result_that_looks_lost_is_done_again_in_the_full_window(
    windowed: WhisperSTT, speech: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.stt as stt_module

    monkeypatch.setattr(stt_module, "_plausible", lambda text, logprob: False)
    before = windowed.rewindowed
    result = windowed.transcribe_sync(speech)
    assert windowed.rewindowed == before + 1
    assert word_match(SENTENCE, result.text) >= 0.7


def test_what_a_lost_whisper_says_is_recognised() -> None:
    from pipeline.stt import _plausible

    assert _plausible("Can you hear me?", -0.2)
    assert not _plausible("Can you hear me? Can you hear me", -0.2)  # its first half twice
    assert not _plausible("the " * 40, -0.2)  # compresses too well
    assert not _plausible("Can you hear me?", -1.5)  # unsure of every word
    assert _plausible("", -0.1)


def test_window_bounds(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="window_s"):
        WhisperSTT("tiny.en", cache_dir=tmp_path, window_s=5.0)


def test_whisper_s_threads_are_not_lowered_with_the_thread_that_loads_it(tmp_path: Path) -> None:
    """CTranslate2 makes its compute threads when the model loads, and they keep the name and
    priority of the thread they are made on. The server loads Whisper from its render pool
    (nice 10, below the event loop); the model loads on its own worker thread instead."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from media_tracks.priority import background_thread

    def stat(tid: str) -> tuple[str, int]:
        base = Path("/proc/self/task") / tid
        fields = (base / "stat").read_text().rsplit(")", 1)[1].split()
        return (base / "comm").read_text().strip(), int(fields[16])  # comm, nice

    stt = WhisperSTT("tiny.en", cache_dir=tmp_path, device="cpu")
    before = set(os.listdir("/proc/self/task"))
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="lowered",
                                initializer=background_thread) as pool:
            lowered = pool.submit(lambda: (stt.load(), threading.get_native_id())[1]).result()
            assert stat(str(lowered))[1] >= 10  # the loading thread really is lowered
        new = set(os.listdir("/proc/self/task")) - before - {str(lowered)}
        threads = {tid: stat(tid) for tid in new}
        main_nice = stat(str(threading.main_thread().native_id))[1]
        made = [nice for name, nice in threads.values() if name.startswith("whisper")]
        assert len(made) >= 2, threads  # the worker and CTranslate2's own thread(s)
        assert made == [main_nice] * len(made), threads
        assert not any(name.startswith("lowered") for name, _ in threads.values()), threads
    finally:
        stt.close()


@pytest.mark.timeout(60)
async def test_a_model_not_loaded_yet_loads_on_its_worker_without_waiting_on_itself(
    tmp_path: Path, speech: np.ndarray
) -> None:
    """``aload`` and a first ``transcribe`` run on the worker thread the model loads on."""
    for first in ("aload", "transcribe"):
        stt = WhisperSTT("tiny.en", cache_dir=tmp_path / first, device="cpu")
        try:
            if first == "aload":
                await stt.aload()
                assert stt.loaded
            else:
                assert word_match(SENTENCE, (await stt.transcribe(speech)).text) > 0.8
        finally:
            stt.close()
