"""The aiohttp application: signaling, sessions, health, and the web pages.

Shutdown (SIGTERM under ``python -m rtc_server``): aiohttp first stops listening, then runs
``on_shutdown`` (``drain``: ``DRAINING`` is set so offers still in flight get 503
``shutting_down``, every session is told ``{"type": "closing", "reason": "shutdown"}`` and
closed, all within ``server.shutdown_grace_s``; a session that does not close in time is left
behind), then waits for HTTP requests in flight, then runs the cleanup contexts (render jobs
cancelled, engines and pools released)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import cv2
from aiohttp import web

from avatars.model import AvatarError
from avatars.registration import PrepareFn, RegistrationService
from avatars.store import AvatarStore
from common.errors import (
    AvatarUnavailable,
    NotFound,
    Overloaded,
    PipelineError,
    ShuttingDown,
)
from common.threads import name_os_thread
from config import Settings
from face.library import AvatarLibrary
from media_tracks.priority import CountedExecutor, LoadGovernor, MediaExecutor, background_thread
from pipeline.lipsync import LipSyncEngine, create_lipsync_engine
from pipeline.lipsync.viseme_engine import VisemeEngine
from pipeline.render.service import start_render_service
from pipeline.replier import Replier
from pipeline.stt import WhisperSTT
from pipeline.tts import PiperTTS, TextToSpeech
from pipeline.turns import turn_detector
from pipeline.vad import SileroVad
from rtc_server.access import install_access
from rtc_server.avatars_api import AvatarApi, add_avatar_routes
from rtc_server.bodies import offer_model, parse
from rtc_server.headroom import Headroom
from rtc_server.ice import browser_ice_servers, resolve_ice_servers
from rtc_server.logs import bind_session
from rtc_server.metrics import Observability
from rtc_server.observability import (
    add_observability_routes,
    http_metrics_middleware,
    session_event_hook,
)
from rtc_server.openapi import add_openapi_route
from rtc_server.pages import handle_index, handle_register, handle_web_file
from rtc_server.render_api import add_render_routes
from rtc_server.services import SERVICES, Engines, Services, services_of
from rtc_server.session import Session
from rtc_server.slots import SessionSlots, Slot
from rtc_server.wire import RETRY_AFTER_S, errors_middleware, json_error, read_json_object

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def shared_stt(model: str, cache_dir: str, device: str, compute_type: str | None,
               language: str | None, beam_size: int, window_s: float,
               cpu_threads: int) -> WhisperSTT:
    """One loaded Whisper model per configuration per process (sessions share it)."""
    stt = WhisperSTT(model, cache_dir=Path(cache_dir), device=device,  # type: ignore[arg-type]
                     compute_type=compute_type, language=language, beam_size=beam_size,
                     window_s=window_s, cpu_threads=cpu_threads)
    stt.load()
    return stt


@functools.lru_cache(maxsize=1)
def shared_vad() -> SileroVad:
    return SileroVad()


def load_listening(settings: Settings) -> tuple[WhisperSTT, SileroVad]:
    """The Whisper model and the VAD model (blocking: call from an executor)."""
    s = settings.stt
    cache = s.cache_dir or str(Path(settings.avatars.data_dir) / "models")
    stt = shared_stt(s.model, cache, s.device, s.compute_type, s.language, s.beam_size,
                     s.window_s, s.cpu_threads)
    turn_detector(settings)  # a configured turns.model loads now, or the server does not start
    return stt, shared_vad()


def replier_factory(settings: Settings) -> Callable[[], Replier]:
    """A new replier per session (each counts its own consecutive failures)."""
    from pipeline.replier import EmbeddedReplier, OpenAIReplier

    llm = settings.llm
    if llm.base_url is None:
        return EmbeddedReplier
    return functools.partial(OpenAIReplier.from_settings, llm)


def _detail(exc: BaseException) -> str:
    return str(getattr(exc, "detail", None) or exc or type(exc).__name__)


async def handle_offer(request: web.Request) -> web.Response:
    services = services_of(request)
    settings = services.settings
    data = await read_json_object(request, settings.server.max_json_depth)
    offer = parse(offer_model(settings), data)  # the model the OpenAPI document publishes
    sdp, avatar_id = offer.sdp, offer.avatar_id
    if services.draining.is_set():
        raise ShuttingDown("the server is shutting down; try again shortly",
                           retry_after_s=RETRY_AFTER_S)
    slots = services.slots
    refusal = services.headroom.refusal(live=slots.taken - slots.pending, pending=slots.pending)
    if refusal is not None:
        reason, detail = refusal
        services.observability.offers_refused_overload.labels(reason).inc()
        raise Overloaded(f"{detail}; try again shortly", retry_after_s=RETRY_AFTER_S)
    # taken before the first await, so concurrent offers can never pass the limit together
    slot = slots.reserve(services.access.client(request))
    try:
        return await _answer_offer(services, sdp, avatar_id, slot)
    except BaseException:
        slot.release()
        raise


async def _answer_offer(services: Services, sdp: str, avatar_id: str, slot: Slot) -> (
    web.Response
):
    settings, sessions, engines = services.settings, services.sessions, services.engines
    library = engines.library
    # held for the call: never unloaded under it (avatars.memory_budget_mb)
    loading = engines.pool.submit(library.acquire, avatar_id)
    try:
        avatar = await asyncio.wrap_future(loading)
    except asyncio.CancelledError:  # the offer went away while the avatar loaded: let go of it
        loading.add_done_callback(
            lambda f: None if f.cancelled() or f.exception() else library.release(avatar_id))
        raise
    except AvatarError as exc:  # registered, but its files are damaged or gone
        logger.error("avatar %s could not be loaded: %s", avatar_id, exc)
        raise AvatarUnavailable(
            f"avatar {avatar_id!r} could not be loaded; register it again"
        ) from exc

    def closed(s: Session) -> None:
        slot.release()
        library.release(avatar_id)
        _forget(sessions, s)

    try:
        session = Session(
            settings=settings,
            avatar=avatar,
            tts=engines.tts,
            lipsync=engines.lipsync,
            render_executor=engines.pool,
            stt=engines.stt,
            vad_model=engines.vad,
            replier=engines.replier(),
            on_closed=closed,
            on_connected=lambda s: slot.connected(),
            governor=engines.governor,
            on_event=session_event_hook(services),
            fallback_lipsync=engines.fallback_lipsync,
        )
    except BaseException:
        library.release(avatar_id)
        raise
    # this task's context, copied into every task created from here on (the session's and
    # aiortc's for this peer connection): their log records carry the session id
    bind_session(session.id)
    sessions[session.id] = session
    try:
        answer = await session.accept_offer(sdp)
    except BaseException:
        await session.aclose("offer failed")
        raise
    if services.draining.is_set():  # shutdown began while the offer was being answered
        await session.aclose("server shutting down")
        raise ShuttingDown("the server is shutting down; try again shortly",
                           retry_after_s=RETRY_AFTER_S)
    logger.info("session %s created (avatar %s)", session.id[:8], avatar_id)
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "session_id": session.id})


def _forget(sessions: dict[str, Session], session: Session) -> None:
    sessions.pop(session.id, None)


async def handle_sessions(request: web.Request) -> web.Response:
    sessions = services_of(request).sessions
    return web.json_response({"sessions": [s.describe() for s in list(sessions.values())]})


async def handle_delete_session(request: web.Request) -> web.Response:
    session = services_of(request).sessions.get(request.match_info["session_id"])
    if session is None:
        return json_error(404, "not_found", "no such session")
    await session.aclose("deleted by API")
    return web.json_response({"id": session.id, "state": session.state})


async def close_sessions(
    sessions: dict[str, Session], *, reason: str, detail: str, timeout_s: float,
    linger_s: float = 0.5,
) -> list[Session]:
    """Tell every session ``closing`` (``reason``, ``detail``), give the messages ``linger_s``
    to leave, then close them all at once, waiting at most ``timeout_s`` in all. Returns the
    sessions that did not close in time (their closing is cancelled and they are left)."""
    live = [s for s in list(sessions.values()) if s.state != "closed"]
    if not live:
        return []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    for s in live:
        s.close_reason = reason
        with contextlib.suppress(Exception):
            s.notify_closing(reason, detail)
    await asyncio.sleep(min(linger_s, timeout_s / 2))
    tasks = {loop.create_task(s.aclose(reason), name=f"close:{s.id[:8]}"): s for s in live}
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
    stuck = [tasks[t] for t in pending]
    for t in pending:
        t.cancel()
    for s in stuck:
        logger.warning("session %s did not close within %.1f s; left behind", s.id[:8],
                       timeout_s)
        sessions.pop(s.id, None)
    return stuck


async def drain(app: web.Application) -> None:
    """``on_shutdown``: no new sessions; every session told and closed within the grace
    (``server.shutdown_grace_s``, less a second kept for requests in flight and cleanup)."""
    services = app[SERVICES]
    services.draining.set()
    grace = services.settings.server.shutdown_grace_s
    sessions = services.sessions
    n = len(sessions)
    stuck = await close_sessions(
        sessions,
        reason="shutdown",
        detail="the server is shutting down; please reconnect in a moment",
        timeout_s=max(0.5, grace - 1.0),
    )
    logger.info("shutdown: %d sessions closed, %d left behind", n - len(stuck), len(stuck))


async def handle_ice_servers(request: web.Request) -> web.Response:
    """The STUN/TURN servers the call page should use (TURN REST credentials are made per
    request when webrtc.turn_secret is set)."""
    webrtc = services_of(request).settings.webrtc
    servers = browser_ice_servers(resolve_ice_servers(webrtc))
    return web.json_response(
        {"iceServers": servers}, headers={"Cache-Control": "no-store"}
    )


def create_app(
    settings: Settings,
    *,
    tts: TextToSpeech | None = None,
    lipsync: LipSyncEngine | None = None,
    replier: Callable[[], Replier] | None = None,
    prepare: PrepareFn | None = None,
    analyzer_factory: Callable[[], object] | None = None,
) -> web.Application:
    """The application. ``tts`` replaces the configured voice and ``lipsync`` the configured
    lip-sync engine (the caller keeps ownership of it); ``prepare`` and
    ``analyzer_factory`` replace avatar registration's face analysis (tests pass fakes)."""
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        # outermost first: metrics see every final answer, errors become JSON, then access
        middlewares=[http_metrics_middleware, errors_middleware],
    )
    s = settings.sessions
    services = Services(
        settings=settings,
        access=install_access(app, settings),
        slots=SessionSlots(max_live=s.max_concurrent, max_pending=s.max_pending,
                           max_pending_per_client=s.max_pending_per_client,
                           retry_after_s=RETRY_AFTER_S),
        observability=Observability(),
        headroom=Headroom(enabled=s.headroom_admission, cpu_target=s.cpu_target,
                          call_cpu_cores=s.call_cpu_cores, max_missed_share=s.max_missed_share),
    )
    app[SERVICES] = services
    data_dir_abs = os.path.abspath(settings.avatars.data_dir)  # for start-up messages

    async def resources(app: web.Application) -> AsyncIterator[None]:
        engines, registration = await _load(settings, services.sessions, tts=tts,
                                            lipsync=lipsync, replier=replier, prepare=prepare,
                                            analyzer_factory=analyzer_factory,
                                            data_dir_abs=data_dir_abs)
        services.loaded = engines
        loop = asyncio.get_running_loop()
        # the governor times the loop from here: start-up's model loading is no call's lag
        governor = engines.governor
        governing = None if governor is None else loop.create_task(governor.run(), name="governor")
        measuring = loop.create_task(services.headroom.run(services.sessions.values),
                                     name="headroom")
        yield
        measuring.cancel()
        if governing is not None:
            governing.cancel()
        await engines.render.aclose()
        # normally none are left (``drain`` closed them); bounded, so none can hold the exit
        await close_sessions(services.sessions, reason="shutdown", detail="the server is stopping",
                             timeout_s=max(0.5, settings.server.shutdown_grace_s / 2))
        await asyncio.to_thread(registration.close)
        if lipsync is None:
            await engines.lipsync.aclose()
        engines.pool.shutdown(wait=True, cancel_futures=True)

    app.cleanup_ctx.append(resources)
    if settings.cluster.role == "node":
        from rtc_server.cluster.node import install_node

        async def close_all(reason: str, detail: str, timeout_s: float) -> object:
            return await close_sessions(services.sessions, reason=reason, detail=detail,
                                        timeout_s=timeout_s)

        install_node(app, settings, close_all=close_all)  # registers once the engines load
    app.on_shutdown.append(drain)
    app.router.add_get("/", handle_index)
    app.router.add_get("/register", handle_register)
    add_observability_routes(app, services)
    add_openapi_route(app, settings)
    app.router.add_post("/offer", handle_offer)
    app.router.add_get("/sessions", handle_sessions)
    app.router.add_delete("/sessions/{session_id}", handle_delete_session)
    add_avatar_routes(app, lambda request: services_of(request).engines.avatar_api)
    add_render_routes(app)
    app.router.add_get("/ice-servers", handle_ice_servers)
    app.router.add_get("/web/{name:.+}", handle_web_file)
    return app


async def _load(
    settings: Settings,
    sessions: dict[str, Session],
    *,
    tts: TextToSpeech | None,
    lipsync: LipSyncEngine | None,
    replier: Callable[[], Replier] | None,
    prepare: PrepareFn | None,
    analyzer_factory: Callable[[], object] | None,
    data_dir_abs: str,
) -> tuple[Engines, RegistrationService]:
    """Start-up: the pools, the avatars (the default one must load), the voice, the lip-sync
    engine, listening and the render service."""
    # sessions render on a thread pool; OpenCV's own threads on top only add spikes
    cv2.setNumThreads(1)
    # audio first under overload: rendering and video encodes run below the event loop's
    # priority, and audio encodes never wait behind video ones (media_tracks/priority.py)
    audio_first = settings.media.audio_first
    pool = CountedExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="render",
                           initializer=background_thread if audio_first else name_os_thread)
    governor: LoadGovernor | None = None
    if audio_first:
        asyncio.get_running_loop().set_default_executor(MediaExecutor())
        governor = LoadGovernor()
    media = settings.media
    store = AvatarStore(Path(settings.avatars.data_dir))
    library = AvatarLibrary(
        data_dir=Path(settings.avatars.data_dir),
        width=media.video_width,
        height=media.video_height,
        store=store,
        budget_bytes=settings.avatars.memory_budget_mb * 1024 * 1024,
    )
    library.pin(settings.avatars.default)
    registration = RegistrationService(
        store, settings.avatars, prepare=prepare, analyzer_factory=analyzer_factory
    )
    avatar_api = AvatarApi(settings=settings.avatars, store=store, library=library,
                           service=registration, sessions=sessions)
    loop = asyncio.get_running_loop()
    # the default avatar must load, or the server does not start
    try:
        await loop.run_in_executor(pool, library.get, settings.avatars.default)
    except (NotFound, AvatarError) as exc:
        raise PipelineError(
            f"avatars.default: the default avatar {settings.avatars.default!r} cannot be "
            f"loaded from {data_dir_abs} (avatars.data_dir): "
            f"{_detail(exc)}; register it there, or set avatars.default to an avatar that "
            "exists (the built-in one is 'default')"
        ) from exc
    if settings.avatars.analyzer == "insightface" and analyzer_factory is None:
        # a configured model pack must be there and load: a clear start-up error, not a
        # failure at the first registration (dlib and Haar load lazily, from packages)
        try:
            await loop.run_in_executor(pool, registration.analyzer)
        except Exception as exc:  # noqa: BLE001 - whatever the pack does: one clear line
            raise PipelineError(
                f"avatars.insightface_root: {_detail(exc)}; point avatars.insightface_root "
                "at such a folder, or set avatars.analyzer: dlib"
            ) from exc
    if tts is None:
        voice = settings.engines.piper_voice
        piper = PiperTTS(
            voice_path=Path(voice) if voice else None,
            sample_rate=media.audio_sample_rate,
            speed=settings.engines.tts_speed,
        )
        await piper.aload()
        tts = piper
    engine = lipsync
    if engine is None:
        engine = await loop.run_in_executor(pool, create_lipsync_engine, settings)
    if settings.conversation.listen:
        stt, vad = await loop.run_in_executor(pool, load_listening, settings)
    else:
        stt, vad = None, None
    render = await start_render_service(settings, library, engine, tts)
    engines = Engines(
        pool=pool,
        library=library,
        avatar_api=avatar_api,
        tts=tts,
        lipsync=engine,
        # cheap (no weights): the engine a call goes on with if its own engine fails
        fallback_lipsync=None if engine.name == "viseme" else VisemeEngine(),
        replier=replier or replier_factory(settings),
        stt=stt,
        vad=vad,
        render=render,
        governor=governor,
    )
    return engines, registration
