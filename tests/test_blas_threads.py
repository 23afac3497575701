"""The server process starts no BLAS thread pool (rtc_server/__init__.py)."""

import os
import subprocess
import sys

COUNT = "import os; print(len(os.listdir('/proc/self/task')))"


def _threads(code: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", f"{code}; {COUNT}"], env=env, check=True,
                         capture_output=True, text=True, cwd=os.path.dirname(__file__) + "/..")
    return int(out.stdout.split()[-1])


def test_numpy_loaded_by_the_server_starts_no_openblas_threads() -> None:
    plain = _threads("import numpy")
    served = _threads("import rtc_server, numpy")
    assert served == 1  # the main thread alone
    if (os.cpu_count() or 1) > 1:
        assert plain > 1  # what numpy does on its own: the test can tell the difference
