"""The avatars a server can put on a call, loaded once and shared by every session.

A loaded avatar holds its prepared ``FaceRenderer`` (thread-safe, precomputed); each session
gets its own ``IdleTimeline`` so blinks are not in lock-step across calls."""

from __future__ import annotations

import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from avatars.model import DEFAULT_AVATAR_DIR, Avatar, AvatarError, load_avatar_dir
from avatars.store import AvatarStore
from media_tracks.idle import FaceRenderer, IdleTimeline
from pipeline.errors import NotFound

BUILTIN_ID = "default"
# Ids are the built-in "default" or server-generated ("av_" + 12 hex digits, see
# avatars/store.py); anything else is refused before touching the file system.
AVATAR_ID_RE = re.compile(r"^(?:av_[0-9a-f]{12}|default)$")


@dataclass(frozen=True, slots=True)
class LoadedAvatar:
    avatar_id: str
    avatar: Avatar
    face: FaceRenderer

    def new_timeline(self) -> IdleTimeline:
        return IdleTimeline(seed=secrets.randbits(32))


class AvatarLibrary:
    """Looks avatars up by id: the built-in ``default`` and the avatars registered in the
    store (``<data_dir>/registry.sqlite3`` + ``<data_dir>/avatars/<id>/``). Loading is
    blocking: call it from an executor."""

    def __init__(
        self, *, data_dir: Path, width: int, height: int, store: AvatarStore | None = None
    ) -> None:
        self._store = store if store is not None else AvatarStore(data_dir)
        self._width = width
        self._height = height
        self._loaded: dict[str, LoadedAvatar] = {}
        self._lock = threading.Lock()

    @property
    def store(self) -> AvatarStore:
        return self._store

    def _folder(self, avatar_id: str) -> Path | None:
        if not AVATAR_ID_RE.fullmatch(avatar_id):
            return None
        if avatar_id == BUILTIN_ID:
            return DEFAULT_AVATAR_DIR
        return self._store.folder(avatar_id)

    def exists(self, avatar_id: str) -> bool:
        if not AVATAR_ID_RE.fullmatch(avatar_id):
            return False
        return avatar_id in self._loaded or self._folder(avatar_id) is not None

    def get(self, avatar_id: str) -> LoadedAvatar:
        """The loaded avatar, loading it on first use. Raises NotFound for unknown ids."""
        if not AVATAR_ID_RE.fullmatch(avatar_id):
            raise NotFound(f"no avatar with id {avatar_id[:40]!r}")
        with self._lock:
            loaded = self._loaded.get(avatar_id)
            if loaded is not None:
                return loaded
            folder = self._folder(avatar_id)
            if folder is None:
                raise NotFound(f"no avatar with id {avatar_id!r}")
            try:
                avatar = load_avatar_dir(folder, width=self._width, height=self._height)
            except AvatarError:
                if self._folder(avatar_id) is None:  # deleted while loading
                    raise NotFound(f"no avatar with id {avatar_id!r}") from None
                raise
            loaded = LoadedAvatar(avatar_id, avatar, FaceRenderer(avatar))
            self._loaded[avatar_id] = loaded
            return loaded

    def forget(self, avatar_id: str) -> None:
        """Drop a loaded avatar (after it was deleted); sessions holding it keep their copy."""
        with self._lock:
            self._loaded.pop(avatar_id, None)
