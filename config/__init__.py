"""Settings for the avatar server: documented defaults in ``defaults.yaml``, typed and validated.

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
