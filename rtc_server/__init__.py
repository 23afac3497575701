"""The server: the aiohttp app (signaling, REST, render and avatar routes, access control,
observability), one session per call, the spoken conversation, and the headless bot client."""

import os

# numpy's OpenBLAS starts a pool of threads when numpy loads, one per further core. A thread
# pool in the server process, even an idle one, slows Whisper's transcriptions in a call (as
# ONNX Runtime's did: pipeline/tts.py); with OpenBLAS on one thread a question's
# transcription took 107-129 ms against 130-159 (``bench/RESULTS.md``). Nothing the server
# runs through BLAS is large enough to want more. Set before anything loads numpy; an
# OPENBLAS_NUM_THREADS already in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
