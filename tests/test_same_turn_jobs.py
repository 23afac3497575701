"""``SameTurnJobs``: the calls made in one turn of the event loop run as one executor job."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import pytest

from media_tracks.frames import SameTurnJobs


class CountingExecutor(Executor):
    """A thread pool that counts the jobs it is given."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(2)
        self.jobs = 0

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        self.jobs += 1
        return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, **kwargs) -> None:  # type: ignore[override]
        self._pool.shutdown(wait)


def test_calls_of_one_turn_run_as_one_job_on_one_thread_in_order() -> None:
    seen: list[tuple[int, int]] = []
    executor = CountingExecutor()

    def square(x: int) -> int:
        seen.append((x, threading.get_ident()))
        return x * x

    jobs = SameTurnJobs(square, executor)

    async def main() -> list[int]:
        first = await asyncio.gather(jobs(1), jobs(2), jobs(3))
        later = await jobs(4)  # a later turn: a job of its own
        return [*first, later]

    assert asyncio.run(main()) == [1, 4, 9, 16]
    executor.shutdown()
    assert executor.jobs == 2
    assert [x for x, _ in seen] == [1, 2, 3, 4]
    assert len({tid for x, tid in seen if x < 4}) == 1


def test_a_group_is_at_most_max_group_calls() -> None:
    executor = CountingExecutor()
    jobs = SameTurnJobs(lambda x: x + 1, executor, max_group=2)

    async def main() -> list[int]:
        return list(await asyncio.gather(*(jobs(i) for i in range(5))))

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]
    executor.shutdown()
    assert executor.jobs == 3


def test_a_failing_call_fails_alone_and_a_cancelled_one_is_left_out() -> None:
    ran: list[int] = []

    def fn(x: int) -> int:
        ran.append(x)
        if x == 2:
            raise ValueError("two")
        return x

    with ThreadPoolExecutor(1) as pool:
        jobs = SameTurnJobs(fn, pool)

        async def main() -> list[object]:
            tasks = [asyncio.ensure_future(jobs(i)) for i in range(4)]
            await asyncio.sleep(0)  # every call is waiting; the job is not submitted yet
            tasks[3].cancel()
            return list(await asyncio.gather(*tasks, return_exceptions=True))

        out = asyncio.run(main())
    assert out[0] == 0 and out[1] == 1
    assert isinstance(out[2], ValueError)
    assert isinstance(out[3], asyncio.CancelledError)
    assert ran == [0, 1, 2]


def test_a_refused_job_fails_its_calls() -> None:
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    jobs = SameTurnJobs(lambda x: x, pool)

    async def main() -> None:
        await asyncio.gather(jobs(1), jobs(2))

    with pytest.raises(RuntimeError):
        asyncio.run(main())
