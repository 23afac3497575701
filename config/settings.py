"""Typed, validated settings: the public names, in one place.

The settings are declared once, in :mod:`config.sections` (each key's type, default, bounds
and doc), read generically by :mod:`config.fields` and layered by :mod:`config.loader`
(defaults <- user YAML file <- ``AVATAR_<SECTION>__<KEY>`` environment <- overrides).
``config/defaults.yaml`` is written from the declarations (:mod:`config.reference`).
"""

from __future__ import annotations

from config.fields import REDACTED, ConfigError
from config.loader import DEFAULTS_FILE, ENV_PREFIX, load_settings
from config.sections import (
    AccessSettings,
    AvatarSettings,
    CacheSettings,
    ConversationSettings,
    EngineSettings,
    JobsSettings,
    LipsyncSettings,
    LlmSettings,
    MediaSettings,
    RenderSettings,
    ServerSettings,
    SessionSettings,
    Settings,
    SttSettings,
    VadSettings,
    WebRTCSettings,
)
from config.values import (
    H264_PRESETS,
    ICE_URL_SCHEMES,
    MAX_FORWARDED_HOPS,
    MIN_SECRET_CHARS,
    RTP_VIDEO_CLOCK_HZ,
    IceServer,
)

__all__ = [
    "DEFAULTS_FILE",
    "ENV_PREFIX",
    "H264_PRESETS",
    "ICE_URL_SCHEMES",
    "MAX_FORWARDED_HOPS",
    "MIN_SECRET_CHARS",
    "REDACTED",
    "RTP_VIDEO_CLOCK_HZ",
    "AccessSettings",
    "AvatarSettings",
    "CacheSettings",
    "ConfigError",
    "ConversationSettings",
    "EngineSettings",
    "IceServer",
    "JobsSettings",
    "LipsyncSettings",
    "LlmSettings",
    "MediaSettings",
    "RenderSettings",
    "ServerSettings",
    "SessionSettings",
    "Settings",
    "SttSettings",
    "VadSettings",
    "WebRTCSettings",
    "load_settings",
]
