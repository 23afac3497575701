"""Video frames ahead of the clock: every planned frame of the next lead is handed to the
session's lip-sync renderer before its deadline, so the video track never waits for pixels."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Generic, Protocol, TypeVar

from face.yuv import Yuv
from media_tracks.clock import MediaClock
from media_tracks.compositor import Compositor, FramePlan

logger = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")


class SameTurnJobs(Generic[P, R]):
    """Runs a blocking ``fn`` in ``executor`` (None: the loop's default), and the calls made
    in the same turn of the event loop, up to ``max_group``, as one job: one after another
    on one thread. A call's frames handed over together (``FrameProducer``'s ``group``) then
    wake one thread, not one each, and the second frame finds the avatar's pixels still in
    the cache; the loop is woken once for both. A call cancelled before its job runs is left
    out of it."""

    def __init__(self, fn: Callable[[P], R], executor: Executor | None, *,
                 max_group: int = 4) -> None:
        self._fn = fn
        self._executor = executor
        self._max_group = max(1, max_group)
        self._pending: list[tuple[P, asyncio.Future[R]]] = []

    async def __call__(self, arg: P) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((arg, future))
        if len(self._pending) == 1:
            loop.call_soon(self._submit, loop)
        return await future

    def _submit(self, loop: asyncio.AbstractEventLoop) -> None:
        pending, self._pending = self._pending, []
        live = [(arg, future) for arg, future in pending if not future.done()]
        for i in range(0, len(live), self._max_group):
            group = live[i : i + self._max_group]
            try:
                job = loop.run_in_executor(self._executor, self._run, [a for a, _ in group])
            except RuntimeError as exc:  # the executor is shut down: the calls fail with it
                for _, future in group:
                    future.set_exception(exc)
                continue
            job.add_done_callback(lambda j, g=group: self._settle(j, g))  # type: ignore[misc]

    def _run(self, args: list[P]) -> list[tuple[bool, R | BaseException]]:
        out: list[tuple[bool, R | BaseException]] = []
        for arg in args:
            try:
                out.append((True, self._fn(arg)))
            except Exception as exc:  # noqa: BLE001 - it belongs to that one call
                out.append((False, exc))
        return out

    @staticmethod
    def _settle(job: asyncio.Future[list[tuple[bool, Any]]],
                group: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results = job.result()
        except BaseException as exc:  # noqa: BLE001 - not a call's own error (``_run`` keeps those)
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), (ok, value) in zip(group, results, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


class SyncRenderer:
    """Adapts a blocking ``plan -> Yuv`` function to the async ``FrameRenderer`` seam by
    running it on ``executor`` (None: the loop's default executor); the plans handed over
    in one turn of the loop render as one job (``SameTurnJobs``)."""

    def __init__(self, fn: Callable[[FramePlan], Yuv], executor: Executor | None) -> None:
        self._fn = fn
        self._jobs: SameTurnJobs[FramePlan, Yuv] = SameTurnJobs(fn, executor)

    def render_sync(self, plan: FramePlan) -> Yuv:
        return self._fn(plan)

    async def render(self, plan: FramePlan) -> Yuv:
        return await self._jobs(plan)


class AsyncRenderer(Protocol):
    async def render(self, plan: FramePlan) -> Yuv: ...


def send_step_ns(audio_frame_ns: int, fps: int) -> int:
    """How often a call's event loop sends media: audio and video frames both lie on the
    media clock's grid, so the sends fall on multiples of gcd(audio frame, video frame) (20 ms
    audio at 25 fps: 0, 20, 40, ... ms; at 30 fps, multiples of 6.67 ms). Half of it past
    one of those multiples is as far from every send as can be."""
    video = Fraction(1_000_000_000, fps)
    return int(Fraction(math.gcd(audio_frame_ns * video.denominator, video.numerator),
                        video.denominator))


LATENCY_SMOOTHING = 0.2  # weight of the newest frame's render time in the running estimate
HEADROOM = 1.25  # margin on the render time estimate (it lags a slowing engine)
MIN_WINDOW = 2  # frames in flight even when overloaded (a batching engine needs company)


@dataclass(slots=True)
class ProducerStats:
    rendered: int = 0
    late: int = 0  # not ready by their deadline (the track had shown another frame)
    skipped: int = 0  # never started: rendering fell more than the lead behind the clock
    failed: int = 0
    rerendered: int = 0  # re-planned by an interruption after they had been rendered
    max_inflight: int = 0
    window: int = 0  # frames allowed in flight now (fewer when rendering is slow)
    frame_ms: float = 0.0  # smoothed render latency divided by the frames in flight with it


class FrameProducer:
    """Keeps the frames of the next ``lead_ms`` in flight: frame ``k`` is handed to the
    renderer once media time reaches ``t_k - lead`` (without waiting for earlier frames, so a
    batching engine sees several frames at once), and ``take(k)`` never waits.

    At most ``max_inflight`` frames render at once (a bounded queue); an interruption
    (``Compositor.clear``) discards frames already rendered or in flight for the re-planned
    media time and renders them again.

    Overload (an engine slower than the frame rate, e.g. too many Wav2Lip calls on a CPU)
    must cost frames, not freeze the picture: with a fixed queue every frame would wait
    behind the others and arrive after its deadline, so none would be shown. Instead the
    producer keeps a smoothed render time per frame in flight (a frame's latency divided by
    the frames in flight with it), allows only as many in flight as fit in the lead, and
    starts a frame only if the frames ahead of it and itself can be rendered before its
    deadline; frames that cannot make it are skipped (counted), so the ones rendered are on
    time and the picture keeps moving.

    ``group`` > 1 hands frames over in groups of that many consecutive frames, all at the
    first one's due time (the others a little earlier than their own): a batching engine
    (Wav2Lip's one inference worker) then gets at least that many frames of a call at once,
    which on a CPU runs a frame in about a fifth less time than one at a time.

    Given the call's ``audio_frame_ns``, every hand-over comes a little later than ``t_k -
    lead`` (less than ``send_step_ns``, at most a quarter of the lead): midway between the
    instants when the call's event loop sends its audio and video and its encoder starts. A
    render started at those instants fights them for the GIL, and each of the threads then
    sleeps and wakes several times a frame: in one speaking call 15 voluntary context
    switches a frame over the server's threads, 10-11 with the render 10 ms off them."""

    def __init__(
        self,
        *,
        clock: MediaClock,
        compositor: Compositor,
        renderer: AsyncRenderer,
        lead_ms: int,
        max_inflight: int | None = None,
        group: int = 1,
        stride: Callable[[], int] | None = None,
        audio_frame_ns: int | None = None,
    ) -> None:
        self._clock = clock
        self._compositor = compositor
        self._renderer = renderer
        self._lead_ns = lead_ms * 1_000_000
        phase = 0
        if audio_frame_ns:  # t_k - lead + phase lands midway between two sends
            step = send_step_ns(audio_frame_ns, compositor.fps)
            phase = (step // 2 + self._lead_ns) % step
        self._phase_ns = min(phase, self._lead_ns // 4)
        self._group = max(1, group)
        self._stride = stride  # render only frames whose index it divides (video shedding)
        lead_frames = -(-lead_ms * compositor.fps // 1000)
        self._max_inflight = max_inflight or max(2, lead_frames + 2)
        self._frame_ns = min(1_000_000_000 // compositor.fps, self._lead_ns // 2)
        self._window = self._max_inflight
        self._per_frame_ns = 0.0  # smoothed render time per frame in flight
        self._ready: dict[int, Yuv] = {}
        self._expired: set[int] = set()  # cancelled by ``take`` at their deadline
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(self._max_inflight)
        self._task: asyncio.Task[None] | None = None
        self._next = 0
        self._wake = asyncio.Event()
        self.stats = ProducerStats()
        compositor.add_cut_listener(self._on_cut)

    @property
    def rendered(self) -> int:
        return self.stats.rendered

    @property
    def skipped(self) -> int:
        return self.stats.skipped

    @property
    def queued(self) -> int:
        """Frames rendered ahead or in flight."""
        return len(self._ready) + len(self._inflight)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="frames")

    async def aclose(self) -> None:
        tasks = list(self._inflight.values())
        if self._task is not None:
            tasks.append(self._task)
            self._task = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
        self._ready.clear()

    async def render_now(self, k: int) -> Yuv:
        """Render frame ``k`` immediately (used once, for the very first frame)."""
        return await self._renderer.render(self._compositor.frame_plan(k))

    def take(self, k: int) -> Yuv | None:
        """The frame for index ``k`` if rendered; older frames are dropped.

        Frames ``<= k`` still in flight can no longer be shown: they are cancelled (and
        counted late), so an engine behind the clock stops spending time on them (the batch
        worker drops a cancelled frame still in its queue) and has it for the next ones."""
        for old in [i for i in self._ready if i < k]:
            del self._ready[old]
        for i in [i for i in self._inflight if i <= k]:
            if self._inflight.pop(i).cancel():
                self._expired.add(i)  # its latency so far still counts (``_render_one``)
                self.stats.late += 1
        return self._ready.pop(k, None)

    def _on_cut(self, k: int) -> None:
        """Frames from ``k`` on were re-planned: forget them and render them again."""
        stale = [i for i in self._ready if i >= k]
        for i in stale:
            del self._ready[i]
        for i in [i for i in self._inflight if i >= k]:
            self._inflight.pop(i).cancel()
            stale.append(i)
        self.stats.rerendered += len(stale)
        if self._task is not None and self._next > k:
            self._next = k
            self._wake.set()

    async def _render_one(self, k: int, plan: FramePlan, depth: int) -> None:
        started = self._clock.now_ns()
        try:
            frame = await self._renderer.render(plan)
        except asyncio.CancelledError:
            if k in self._expired:  # stopped at its deadline by ``take``: it took at least this
                self._expired.discard(k)
                self._observe((self._clock.now_ns() - started) / depth)
            raise
        except Exception:
            logger.exception("rendering frame %d failed", k)
            self.stats.failed += 1
            return
        now = self._clock.now_ns()
        # time per frame: the latency shared by the frames that were in flight with it (a
        # serial engine's latency grows with the queue, a batching one's hardly does)
        self._observe((now - started) / depth)
        if now > self._compositor.frame_t_ns(k):
            self.stats.late += 1  # the track has already moved past it
            return
        self._ready[k] = frame
        self.stats.rendered += 1

    def _observe(self, per_frame_ns: float) -> None:
        """Smooth the render time per frame in flight; size the window to fit the lead."""
        self._per_frame_ns += LATENCY_SMOOTHING * (per_frame_ns - self._per_frame_ns)
        fits = int(self._lead_ns // max(HEADROOM * self._per_frame_ns, 1))
        self._window = max(MIN_WINDOW, min(self._max_inflight, fits))
        self.stats.window = self._window
        self.stats.frame_ms = round(self._per_frame_ns / 1e6, 2)

    def _done(self, k: int, task: asyncio.Task[None]) -> None:
        # a done callback, not ``finally``: a task cancelled before it ever ran skips its body
        self._slots.release()
        self._expired.discard(k)  # (cancelled before it ever ran: never observed)
        if self._inflight.get(k) is task:
            del self._inflight[k]
        self._wake.set()  # the window may let the next frame start

    async def _run(self) -> None:
        comp, clock = self._compositor, self._clock
        loop = asyncio.get_running_loop()
        self._next = comp.frame_at_or_after_ns(clock.now_ns())
        while True:
            await self._slots.acquire()
            try:
                while True:
                    k = self._next
                    now = clock.now_ns()
                    # a frame that cannot be rendered before its deadline, behind those in
                    # flight, is skipped: rendering it would only make the next ones late too
                    # (at most the lead less one frame: a frame is started up to one frame
                    # after its due time, and a timer never fires exactly on time)
                    expected = HEADROOM * (len(self._inflight) + 1) * self._per_frame_ns
                    horizon = now + min(int(expected), self._lead_ns - self._frame_ns)
                    if comp.frame_t_ns(k) < horizon:
                        ahead = comp.frame_at_or_after_ns(horizon)
                        self.stats.skipped += ahead - k
                        k = self._next = ahead
                    stride = self._stride() if self._stride is not None else 1
                    if stride > 1 and k % stride:  # shed: the track will not send it
                        k = self._next = k + stride - k % stride
                    # frames of one group are handed over together, at the first one's time
                    due = comp.frame_t_ns(k - k % self._group) - self._lead_ns + self._phase_ns
                    if due <= now and len(self._inflight) < self._window:
                        break
                    self._wake.clear()
                    if due <= now:  # the window is full: wait for a frame to finish
                        await self._wake.wait()
                        continue
                    await clock.wait_until_ns(due, self._wake)
            except BaseException:
                self._slots.release()
                raise
            self._next = k + 1
            if k in self._ready or k in self._inflight:
                self._slots.release()
                continue
            depth = len(self._inflight) + 1
            task = loop.create_task(
                self._render_one(k, comp.frame_plan(k), depth), name=f"frame-{k}"
            )
            task.add_done_callback(lambda t, k=k: self._done(k, t))  # type: ignore[misc]
            self._inflight[k] = task
            self.stats.max_inflight = max(self.stats.max_inflight, len(self._inflight))
