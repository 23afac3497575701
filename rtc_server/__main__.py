"""``python -m rtc_server [--config FILE] [--port N] [--host H]``"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aiohttp import web

from avatars.model import AvatarError
from config import ConfigError, load_settings
from pipeline.errors import AvatarServerError
from rtc_server.app import create_app
from rtc_server.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtc_server", description=__doc__)
    parser.add_argument("--config", type=Path, help="a YAML file overriding config/defaults.yaml")
    parser.add_argument("--port", type=int, help="listen port (server.port)")
    parser.add_argument("--host", help="listen address (server.host)")
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {}
    if args.port is not None:
        overrides["server.port"] = args.port
    if args.host is not None:
        overrides["server.host"] = args.host
    try:
        settings = load_settings(config_file=args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    app = create_app(settings)
    host, port = settings.server.host, settings.server.port
    print(f"avatar server on http://{'localhost' if host == '0.0.0.0' else host}:{port}",
          flush=True)
    try:
        web.run_app(app, host=host, port=port, print=None, handle_signals=True)
    except (AvatarServerError, AvatarError, OSError) as exc:
        print(f"start-up failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
