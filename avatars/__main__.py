"""Register, list and delete avatars from the command line.

    python -m avatars register FILE --name NAME [--data-dir DIR] [--config FILE]
    python -m avatars list [--data-dir DIR] [--config FILE]
    python -m avatars delete ID [--data-dir DIR] [--config FILE]

Uses the server's settings (config/defaults.yaml <- --config <- AVATAR_* environment) and the
same registration service as ``POST /avatars``; it may run while the server does (the
registry is shared safely). Results are printed to stdout as JSON; progress goes to stderr.
A refusal prints its reason to stderr and exits with status 1 (2 for a bad configuration).

``delete`` cannot see the server's live calls: a call already showing the avatar keeps its
loaded copy until it ends, but no new call can pick it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from avatars.model import BUILTIN_ID
from avatars.registration import PrepareFn, RegistrationService, UploadTooLarge
from avatars.store import AvatarStore, is_registered_id
from common.errors import AvatarServerError
from config import ConfigError, Settings, load_settings

BAR_WIDTH = 30
_STAGE_LABELS = {"decode": "decoding", "analyse": "analysing", "store": "storing"}


class ProgressBar:
    """A plain-text progress bar on ``stream``: redrawn in place on a terminal, one line per
    10 % otherwise (logs, pipes)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.stage: str | None = None
        self.shown = -1

    def __call__(self, stage: str, fraction: float) -> None:
        percent = int(round(100 * min(1.0, max(0.0, fraction))))
        if stage != self.stage:
            self.finish()
            self.stage, self.shown = stage, -1
        if percent == self.shown:
            return
        if not self.tty and 0 <= self.shown and percent // 10 == self.shown // 10 < 10:
            return
        self.shown = percent
        filled = BAR_WIDTH * percent // 100
        label = _STAGE_LABELS.get(stage, stage)
        line = f"{label:<9} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {percent:3d}%"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and self.stage is not None:
            self.stream.write("\n")
            self.stream.flush()
        self.stage = None


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="avatar data directory (avatars.data_dir)")
    common.add_argument("--config", type=Path, help="a YAML file overriding the defaults")
    parser = argparse.ArgumentParser(
        prog="python -m avatars", description="Register, list and delete avatars."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", parents=[common], help="register an image or video")
    reg.add_argument("file", type=Path, help="a JPEG/PNG/WebP image, GIF, MP4, MOV or WebM")
    reg.add_argument("--name", required=True, help="display name (1..100 characters)")
    sub.add_parser("list", parents=[common], help="list the registered avatars")
    rm = sub.add_parser("delete", parents=[common], help="delete a registered avatar")
    rm.add_argument("id", help="the avatar id (av_...)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if args.data_dir is not None:
        overrides["avatars.data_dir"] = args.data_dir
    return load_settings(config_file=args.config, overrides=overrides)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _register(
    args: argparse.Namespace,
    settings: Settings,
    store: AvatarStore,
    prepare: PrepareFn | None,
    analyzer_factory: Callable[[], Any] | None,
) -> int:
    path: Path = args.file
    limit = settings.avatars.max_upload_bytes
    try:
        size = path.stat().st_size
        if size > limit:
            raise UploadTooLarge(f"{path} is {size} bytes; at most {limit} are accepted")
        data = path.read_bytes()
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    service = RegistrationService(
        store, settings.avatars, prepare=prepare, analyzer_factory=analyzer_factory
    )
    bar = ProgressBar(sys.stderr)
    try:
        record, created = asyncio.run(service.register(data, args.name, progress=bar))
    finally:
        bar.finish()
        service.close()
    body = record.to_dict()
    body["created"] = created
    if not created:
        print(f"already registered as {record.id} ({record.name!r})", file=sys.stderr)
    _print_json(body)
    return 0


def _delete(args: argparse.Namespace, settings: Settings, store: AvatarStore) -> int:
    avatar_id: str = args.id
    if avatar_id == BUILTIN_ID:
        raise _Refusal("builtin_avatar", "the built-in avatar cannot be deleted")
    if avatar_id == settings.avatars.default:
        raise _Refusal(
            "default_avatar",
            f"{avatar_id} is the server's default avatar (avatars.default); change the setting "
            "first",
        )
    if not is_registered_id(avatar_id) or not store.delete(avatar_id):
        raise _Refusal("not_found", f"no avatar with id {avatar_id[:40]!r}")
    _print_json({"id": avatar_id, "deleted": True})
    return 0


class _Refusal(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def main(
    argv: list[str] | None = None,
    *,
    prepare: PrepareFn | None = None,
    analyzer_factory: Callable[[], Any] | None = None,
) -> int:
    """The CLI. ``prepare`` and ``analyzer_factory`` replace the face analysis (tests)."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    store = AvatarStore(settings.avatars.data_dir)
    try:
        if args.command == "register":
            return _register(args, settings, store, prepare, analyzer_factory)
        if args.command == "list":
            _print_json([r.to_dict() for r in store.list()])
            return 0
        return _delete(args, settings, store)
    except (AvatarServerError, _Refusal) as exc:
        code = getattr(exc, "code", "error")
        print(f"refused ({code}): {exc.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
