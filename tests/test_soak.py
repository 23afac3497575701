"""Soak, reduced for CI: 25 connect/disconnect cycles with the bot after 5 warm-up ones,
against a real server process (``bench.soak`` runs 200). Memory grows less than 50 MB after the
warm-up, no session is left, and the server's asyncio tasks, threads and file descriptors
come back to their level after the warm-up."""

from __future__ import annotations

import pytest

from bench.common import start_server
from bench.soak import SERVER_ENV, soak

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CYCLES = 25
WARMUP = 5
MAX_RSS_GROWTH_BYTES = 50 * 1024 * 1024
TASK_TOLERANCE = 3  # a scrape or a log flush in flight at the moment of a snapshot
# Codec threads (libvpx, per encoder) live until their session's sender is collected, so the
# server's thread count swings with the garbage collector (16..50 over bench.soak's 200
# cycles); a leak is one thread or more for every call
THREAD_TOLERANCE = CYCLES - 1
FD_TOLERANCE = 4


@pytest.fixture
def server(loopback_only):
    proc, url = start_server(SERVER_ENV)
    try:
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(30)


async def test_connect_disconnect_cycles_leak_nothing(server):
    proc, url = server
    result = await soak(url, proc.pid, cycles=CYCLES, warmup=WARMUP, every=5)
    summary = result.summary()
    assert not result.failures, result.failures
    assert result.leftover_sessions == [], result.leftover_sessions
    assert all(s.sessions == 0 for s in result.snapshots), result.snapshots
    assert result.rss_growth_bytes < MAX_RSS_GROWTH_BYTES, summary
    base, end = result.baseline, result.final
    if base.asyncio_tasks is not None and end.asyncio_tasks is not None:
        assert end.asyncio_tasks <= base.asyncio_tasks + TASK_TOLERANCE, summary
    assert end.threads <= base.threads + THREAD_TOLERANCE, summary
    assert end.open_fds <= base.open_fds + FD_TOLERANCE, summary
    # the bots' side cleans up too
    assert result.client_tasks_after <= result.client_tasks_before + TASK_TOLERANCE, summary
