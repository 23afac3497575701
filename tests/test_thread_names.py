"""OS thread names: what the benchmarks read to tell the server's threads apart."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from common.threads import name_os_thread, os_thread_named
from pipeline.lipsync.backends import MODEL_THREADS

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def comm() -> str:
    return Path("/proc/thread-self/comm").read_text().strip()


def test_threads_started_inside_keep_the_name_and_the_caller_gets_its_own_back() -> None:
    seen: dict[str, str] = {}

    def body() -> None:
        name_os_thread("caller-test")
        with os_thread_named(MODEL_THREADS):
            seen["inside"] = comm()
            child = threading.Thread(target=lambda: seen.update(child=comm()))
            child.start()
            child.join()
        seen["after"] = comm()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"inside": "model", "child": "model", "after": "caller-test"}


def test_an_openvino_models_threads_are_named_model(wav2lip_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from pipeline.lipsync.backends import load_runner

    before = {t.name for t in Path("/proc/self/task").iterdir()}
    runner = load_runner(wav2lip_onnx, device="openvino", precision="fp32", fp16=False,
                         intra_op_threads=0, cache_dir=tmp_path)

    runner.run(np.zeros((1, 1, 80, 16), np.float32), np.zeros((1, 6, 96, 96), np.float32))
    new = [t for t in Path("/proc/self/task").iterdir() if t.name not in before]
    names = {(t / "comm").read_text().strip() for t in new if (t / "comm").exists()}
    assert "model" in names, names
    assert comm() != "model"
