"""Render a clip from the command line.

    python -m pipeline.render --avatar ID --text "Hello there." -o out.mp4
    python -m pipeline.render --audio speech.wav -o out.webm --timeline out.json

The format follows the suffix of ``-o`` (.mp4: H.264 + AAC, .webm: VP9 + Opus). Uses the
server's settings (config/defaults.yaml <- --config <- AVATAR_* environment), its lip-sync
engine and its avatars (``avatars.data_dir``; "default" is built in). A progress bar goes to
stderr, the manifest (JSON) to stdout. Exit status: 0 done, 2 bad input or configuration (one
line on stderr saying why), 1 the render failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import TextIO

from common.errors import AvatarServerError, BadRequest, NotFound
from config import ConfigError, Settings, load_settings
from pipeline.render.spec import FORMATS, MAX_SPEED, MIN_SPEED, TIMELINE_FILE, RenderSpec

BAR_WIDTH = 30


class ProgressBar:
    """``stage [#####.....]  42%`` redrawn in place (carriage return) on ``stream``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.shown: tuple[str, int] | None = None

    def __call__(self, percent: float, stage: str) -> None:
        whole = int(min(100.0, max(0.0, percent)))
        if self.shown == (stage, whole):
            return
        self.shown = (stage, whole)
        filled = BAR_WIDTH * whole // 100
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        self.stream.write(f"\r{stage:<12} [{bar}] {whole:3d}%")
        self.stream.flush()

    def finish(self) -> None:
        if self.shown is not None:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = None


class UsageError(Exception):
    """Bad arguments: reported on one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.render",
        description="Render a clip of an avatar speaking text or audio.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="what the avatar says")
    source.add_argument("--audio", type=Path, help="an audio file the avatar lip-syncs to")
    p.add_argument("-o", "--output", type=Path, required=True, help="out.mp4 or out.webm")
    p.add_argument("--avatar", help="avatar id (default: the configured avatars.default)")
    p.add_argument("--voice", default="default", help="voice name (default: default)")
    p.add_argument("--speed", type=float, default=1.0, help="speech rate 0.5..2.0 (default 1)")
    p.add_argument("--fps", type=int, help="frames per second (default: media.fps)")
    p.add_argument("--timeline", type=Path, help="also write the animation timeline (JSON)")
    p.add_argument("--config", type=Path, help="a YAML file overriding the defaults")
    p.add_argument("--data-dir", help="avatar data directory (avatars.data_dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if args.data_dir is not None:
        overrides["avatars.data_dir"] = args.data_dir
    return load_settings(config_file=args.config, overrides=overrides)


def _spec(args: argparse.Namespace, settings: Settings) -> RenderSpec:
    """The spec, with every argument checked before anything heavy is loaded."""
    fmt = args.output.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise UsageError(f"-o must end in .mp4 or .webm, got {args.output.name!r}")
    if not args.output.parent.is_dir():
        raise UsageError(f"no such folder for the output: {args.output.parent}")
    if not MIN_SPEED <= args.speed <= MAX_SPEED:
        raise UsageError(f"--speed must be in {MIN_SPEED}..{MAX_SPEED}, got {args.speed:g}")
    fps = args.fps if args.fps is not None else settings.media.fps
    lo, hi = settings.render.min_fps, settings.render.max_fps
    if not lo <= fps <= hi:
        raise UsageError(f"--fps must be in {lo}..{hi}, got {fps}")
    key = hashlib.sha256()
    if args.text is not None:
        if not args.text.strip():
            raise UsageError("--text is empty")
        limit = settings.render.max_text_chars
        if len(args.text) > limit:
            raise UsageError(f"--text is over {limit} characters ({len(args.text)})")
        key.update(args.text.encode())
    else:
        audio: Path = args.audio
        if not audio.is_file():
            raise UsageError(f"no such audio file: {audio}")
        size = audio.stat().st_size
        if size > settings.render.max_audio_bytes:
            raise UsageError(
                f"{audio} is {size} bytes; at most {settings.render.max_audio_bytes} are accepted"
            )
        key.update(hashlib.sha256(audio.read_bytes()).digest())
    avatar = args.avatar or settings.avatars.default
    from face.library import AvatarLibrary

    media = settings.media
    library = AvatarLibrary(
        data_dir=Path(settings.avatars.data_dir), width=media.video_width, height=media.video_height
    )
    if not library.exists(avatar):
        raise UsageError(f"no avatar with id {avatar[:40]!r}")
    key.update(json.dumps([avatar, args.voice, args.speed, fmt, fps]).encode())
    return RenderSpec(
        avatar_id=avatar,
        text=args.text,
        audio_path=str(args.audio.resolve()) if args.audio is not None else None,
        voice=args.voice,
        speed=float(args.speed),
        format=fmt,
        fps=fps,
        cache_key=key.hexdigest(),
    )


def _render(args: argparse.Namespace, settings: Settings, spec: RenderSpec, bar: TextIO) -> int:
    from pipeline.render.core import ClipRenderer

    renderer = ClipRenderer.from_settings(settings)
    if spec.voice not in renderer.voices():
        renderer.close()
        raise UsageError(f"unknown voice {spec.voice!r}; known: {', '.join(renderer.voices())}")
    progress = ProgressBar(bar)
    work = Path(tempfile.mkdtemp(prefix=".render-", dir=args.output.parent))
    try:
        manifest = renderer.render(
            spec, work, lambda p, s: None if args.quiet else progress(p, s), threading.Event()
        )
        progress.finish()
        files = manifest["files"]
        assert isinstance(files, dict)
        shutil.move(work / str(files["video"]), args.output)
        manifest["output"] = str(args.output)
        if args.timeline is not None:
            shutil.move(work / TIMELINE_FILE, args.timeline)
            manifest["timeline_output"] = str(args.timeline)
    finally:
        progress.finish()
        shutil.rmtree(work, ignore_errors=True)
        renderer.close()
    print(json.dumps(manifest, indent=2))
    return 0


def main(argv: list[str] | None = None, *, stderr: TextIO | None = None) -> int:
    err = stderr or sys.stderr
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        spec = _spec(args, settings)
        return _render(args, settings, spec, err)
    except ConfigError as exc:
        print(f"config error: {exc}", file=err)
        return 2
    except UsageError as exc:
        print(f"error: {exc}", file=err)
        return 2
    except (BadRequest, NotFound) as exc:
        print(f"error: {exc.detail}", file=err)
        return 2
    except AvatarServerError as exc:
        print(f"render failed ({exc.code}): {exc.detail}", file=err)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
