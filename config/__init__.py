"""Settings for the avatar server: declared once (``sections.py``), typed and validated;
``defaults.yaml`` is their documented reference, written from the declarations.

Usage: ``settings = load_settings(config_file=path, overrides={"server.port": 9000})``.
"""

from config.settings import (
    DEFAULTS_FILE,
    ENV_PREFIX,
    AvatarSettings,
    ConfigError,
    EngineSettings,
    IceServer,
    MediaSettings,
    ServerSettings,
    SessionSettings,
    Settings,
    WebRTCSettings,
    load_settings,
)

__all__ = [
    "DEFAULTS_FILE",
    "ENV_PREFIX",
    "AvatarSettings",
    "ConfigError",
    "EngineSettings",
    "IceServer",
    "MediaSettings",
    "ServerSettings",
    "SessionSettings",
    "Settings",
    "WebRTCSettings",
    "load_settings",
]
