"""The application's state in one typed object (``app[SERVICES]``): settings, the sessions, the
engines loaded at start-up and the services the routes share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from config import Settings
from face.library import AvatarLibrary
from media_tracks.priority import CountedExecutor, LoadGovernor
from pipeline.lipsync import LipSyncEngine
from pipeline.render.service import RenderService
from pipeline.replier import Replier
from pipeline.stt import WhisperSTT
from pipeline.tts import TextToSpeech
from pipeline.vad import SileroVad
from rtc_server.access import AccessControl
from rtc_server.avatars_api import AvatarApi
from rtc_server.headroom import Headroom
from rtc_server.metrics import Observability
from rtc_server.session import Session
from rtc_server.slots import SessionSlots

__all__ = ["SERVICES", "Engines", "Services", "services_of"]


@dataclass(slots=True)
class Engines:
    """What the start-up context loads and the shutdown releases."""

    pool: CountedExecutor  # renders and model calls of the sessions
    library: AvatarLibrary
    avatar_api: AvatarApi
    tts: TextToSpeech
    lipsync: LipSyncEngine
    # the engine a session falls back to when its lip-sync engine fails (None: the engine
    # is already the viseme engine)
    fallback_lipsync: LipSyncEngine | None
    replier: Callable[[], Replier]  # a new replier per session
    stt: WhisperSTT | None  # None unless conversation.listen
    vad: SileroVad | None
    render: RenderService
    governor: LoadGovernor | None  # media.audio_first


@dataclass(slots=True)
class Services:
    """One application's shared state; ``engines`` once start-up has loaded them."""

    settings: Settings
    access: AccessControl
    slots: SessionSlots
    observability: Observability
    headroom: Headroom
    sessions: dict[str, Session] = field(default_factory=dict)
    # set on shutdown: no new sessions, /ready answers 503
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    loaded: Engines | None = None

    @property
    def engines(self) -> Engines:
        """The loaded engines (routes only run after start-up, so they are there)."""
        if self.loaded is None:
            raise RuntimeError("the application has not started")
        return self.loaded


SERVICES = web.AppKey("services", Services)


def services_of(request: web.Request) -> Services:
    return request.app[SERVICES]
