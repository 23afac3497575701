"""``python -m rtc_server [--config FILE] [--port N] [--host H]``

Exit status: 0 after a clean shutdown (SIGTERM or Ctrl-C: clients are told and every call is
closed within ``server.shutdown_grace_s``), 1 when start-up fails (one line on stderr,
``start-up failed: ...``, naming the setting to change and its value or file), 2 for a bad
config."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from config import ConfigError, Settings, load_settings
from rtc_server.app import create_app
from rtc_server.cluster.node import NODE
from rtc_server.ice import use_host_candidates
from rtc_server.logs import configure_logging
from rtc_server.services import SERVICES

logger = logging.getLogger("rtc_server")


def _drain_at_once_on_sigterm(app: web.Application) -> None:
    """Replace aiohttp's SIGTERM/SIGINT handler by one that marks the app draining before
    aiohttp's graceful exit starts: an offer already being answered gets 503."""

    def on_signal() -> None:
        agent = app.get(NODE)
        if agent is not None and not agent.draining:
            # a node drains first: its calls go on until they end (cluster.drain_timeout_s)
            agent.on_drained = _exit_soon
            agent.drain()
            return
        app[SERVICES].draining.set()
        raise web.GracefulExit()

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal)
            except (NotImplementedError, RuntimeError):  # not on this platform or thread
                pass

    app.on_startup.append(install)


def _exit_soon() -> None:
    """Leave ``web.run_app`` gracefully from the event loop (as its own signal handler does:
    ``GracefulExit`` is a ``SystemExit``, which the loop lets through)."""

    def leave() -> None:
        raise web.GracefulExit()

    asyncio.get_running_loop().call_soon(leave)


def _freeze_start_up_objects(app: web.Application) -> None:
    """Once everything is loaded (models, voices, avatars, libraries), move it out of the
    cyclic garbage collector's reach (``gc.freeze``): it lives as long as the server, and a
    full collection walking it all holds the event loop. Measured with two Wav2Lip calls on
    2 cores: without this, full collections of 34-206 ms at start-up and one of 171 ms while
    the calls ran (four frames' time); with it, the one after start-up took 4 ms."""

    async def freeze(app: web.Application) -> None:
        gc.collect()
        gc.freeze()
        logger.debug("gc: %d start-up objects frozen", gc.get_freeze_count())

    app.on_startup.append(freeze)  # after ``create_app``'s start-up, which loads everything


def _folder_settings(settings: Settings) -> list[tuple[str, str]]:
    """(key, value) of the settings naming folders the server writes, most specific first."""
    named = [
        ("cache.dir", settings.cache.dir),
        ("stt.cache_dir", settings.stt.cache_dir),
        ("lipsync.model_cache_dir", settings.lipsync.model_cache_dir),
        ("avatars.data_dir", settings.avatars.data_dir),
    ]
    found = [(key, value) for key, value in named if value]
    return sorted(found, key=lambda kv: -len(os.path.abspath(kv[1])))


def _setting_of_path(settings: Settings, exc: OSError) -> tuple[str, str] | None:
    """The folder setting an OS error's file lies in, if any."""
    for filename in (exc.filename, exc.filename2):
        if not isinstance(filename, str | os.PathLike):
            continue
        path = Path(os.path.abspath(filename))
        for key, value in _folder_settings(settings):
            if path.is_relative_to(os.path.abspath(value)):
                return key, value
    return None


def _check_data_dir(settings: Settings) -> str | None:
    """Create ``avatars.data_dir`` if need be; a start-up error message when that fails."""
    value = settings.avatars.data_dir
    try:
        Path(value).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if isinstance(exc, FileExistsError):
            reason = f"{exc.filename} exists and is not a folder"
        elif exc.filename:
            reason = f"{exc.strerror or exc}: {exc.filename}"
        else:
            reason = str(exc)
        return (f"avatars.data_dir: cannot create the folder {_shown(value)}: {reason}; "
                "set avatars.data_dir to a folder the server can create and write")
    return None


def _shown(value: str) -> str:
    """A path setting's value, with its absolute form when that differs."""
    where = os.path.abspath(value)
    return repr(value) if where == value else f"{value!r} ({where})"


def _listen_failure(settings: Settings, exc: OSError) -> str:
    """An error from opening the listening socket, naming the setting to change."""
    host, port = settings.server.host, settings.server.port
    if isinstance(exc, socket.gaierror):
        return (f"server.host: {host!r} does not resolve to an address to listen on "
                f"({exc.strerror or exc}); set server.host (--host) to an address or name of "
                "this machine, e.g. 127.0.0.1 or 0.0.0.0")
    if exc.errno in (errno.EADDRINUSE, errno.EACCES):
        return (f"server.port: cannot listen on port {port} of {host!r} (server.host): {exc}; "
                "set server.port (--port) to a free port this user may open")
    return (f"server.host: cannot listen on {host!r} port {port} (server.port): {exc}; set "
            "server.host (--host) to an address of this machine, e.g. 127.0.0.1 or 0.0.0.0")


def _start_up_failure(settings: Settings, exc: Exception, *, listening: bool) -> str:
    """The one line for an exception that stopped the server from starting."""
    detail = getattr(exc, "detail", None)
    if detail:
        return str(detail)
    if isinstance(exc, OSError):
        if listening:
            return _listen_failure(settings, exc)
        named = _setting_of_path(settings, exc)
        if named is not None:
            key, value = named
            return (f"{key}: the folder {_shown(value)} cannot be used: "
                    f"{exc}; set {key} to a folder the server can create and write")
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# glibc mallopt parameters (malloc.h)
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 512 * 1024
ARENA_MAX = 2
# setting the mmap threshold also fixes the trim threshold at 128 KiB: every frame freed at the
# top of the heap gave its pages back and the next one faulted them in again (0.2 ms a
# rendered frame at 512x512, issue 21); a 2 MiB pad is kept at the top instead
TOP_PAD_BYTES = 2 * 1024 * 1024


def tune_malloc() -> bool:
    """glibc only: blocks of 512 KiB and more (video frames, codec buffers, an avatar's loop
    frames) are mmapped, so they go back to the system when freed, threads share 2 arenas,
    and a 2 MiB pad stays at the top of the heap. glibc's default raises the mmap threshold
    to the largest block freed so far (up to 32 MiB); past that such blocks come from
    per-thread arenas (up to 8 a core) and stay in the process: RSS ratcheted up over calls,
    and a registered or unloaded video avatar's frames stayed. ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_ARENA_MAX`` or ``MALLOC_TOP_PAD_`` in the environment win.
    True when applied."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    done = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and done
    if "MALLOC_ARENA_MAX" not in os.environ:
        done = bool(mallopt(_M_ARENA_MAX, ARENA_MAX)) and done
    if "MALLOC_TOP_PAD_" not in os.environ:
        done = bool(mallopt(_M_TOP_PAD, TOP_PAD_BYTES)) and done
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtc_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="a YAML file overriding config/defaults.yaml")
    parser.add_argument("--port", type=int, help="listen port (server.port)")
    parser.add_argument("--host", help="listen address (server.host)")
    args = parser.parse_args(argv)
    tune_malloc()  # before the server's threads start allocating
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
    problem = _check_data_dir(settings)
    if problem is not None:
        print(f"start-up failed: {problem}", file=sys.stderr)
        return 1
    # process-wide and explicit: which host candidates ICE gathers (webrtc.host_candidates)
    use_host_candidates(settings.webrtc.host_candidates)
    if settings.cluster.role == "front":  # no engines: routes calls to the nodes
        from rtc_server.cluster.front import create_front_app

        app = create_front_app(settings)
    else:
        app = create_app(settings)
        _drain_at_once_on_sigterm(app)
        _freeze_start_up_objects(app)
    listening = False  # set once the app has loaded: what fails after that is the socket

    async def mark_loaded(app: web.Application) -> None:
        nonlocal listening
        listening = True

    app.on_startup.append(mark_loaded)  # last: after every loader
    host, port = settings.server.host, settings.server.port
    print(f"avatar server on http://{'localhost' if host == '0.0.0.0' else host}:{port}",
          flush=True)
    try:
        web.run_app(
            app,
            host=host,
            port=port,
            print=None,
            handle_signals=True,
            # requests still in flight after the sessions are closed (job progress sockets,
            # synchronous renders) get this long before they are cancelled
            shutdown_timeout=min(1.0, settings.server.shutdown_grace_s),
        )
    except Exception as exc:  # noqa: BLE001 - start-up: one line, never a traceback
        logger.debug("start-up failed", exc_info=True)
        detail = _start_up_failure(settings, exc, listening=listening)
        print(f"start-up failed: {detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
