"""The avatars a server can put on a call, loaded once and shared by every session.

A loaded avatar holds its prepared ``FaceRenderer`` (thread-safe, precomputed); each session
gets its own ``IdleTimeline`` so blinks are not in lock-step across calls.

Avatars load on first use and stay while the memory they hold (their frames, crops and masks:
``avatar_bytes``) fits ``budget_bytes``; past it the least recently used are dropped. One a
call holds (:meth:`AvatarLibrary.acquire` until :meth:`~AvatarLibrary.release`) is never
dropped: the library may then be over its budget until the call ends."""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avatars.model import BUILTIN_ID, DEFAULT_AVATAR_DIR, Avatar, AvatarError, load_avatar_dir
from avatars.store import AvatarStore
from common.errors import NotFound
from face.renderer import FaceRenderer
from face.timeline import IdleTimeline

logger = logging.getLogger(__name__)

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


def _array_bytes(value: Any, seen: set[int], depth: int = 0) -> int:
    if id(value) in seen or depth > 4:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, list | tuple):
        return sum(_array_bytes(v, seen, depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(_array_bytes(v, seen, depth + 1) for v in value.values())
    fields = getattr(value, "__dict__", None)
    if fields is None and hasattr(value, "__slots__"):
        fields = {k: getattr(value, k, None) for k in value.__slots__}
    if isinstance(fields, dict) and not isinstance(value, type):
        return sum(_array_bytes(v, seen, depth + 1) for v in fields.values())
    return 0


def avatar_bytes(loaded: LoadedAvatar) -> int:
    """The memory a loaded avatar holds in arrays (its frames, landmarks, and what its face
    renderer precomputed), counted once each."""
    seen: set[int] = set()
    return _array_bytes(loaded.avatar, seen) + _array_bytes(loaded.face, seen)


class AvatarLibrary:
    """Looks avatars up by id: the built-in ``default`` and the avatars registered in the
    store (``<data_dir>/registry.sqlite3`` + ``<data_dir>/avatars/<id>/``). Loading is
    blocking: call it from an executor. One avatar loads at a time; an avatar already loaded,
    ``release``, ``stats`` and ``loaded_ids`` never wait for a load (they are safe on the
    event loop)."""

    def __init__(
        self, *, data_dir: Path, width: int, height: int, store: AvatarStore | None = None,
        budget_bytes: int | None = None,
    ) -> None:
        """``budget_bytes``: the memory loaded avatars may hold before the least recently
        used ones no call holds are dropped (None: no limit)."""
        self._store = store if store is not None else AvatarStore(data_dir)
        self._width = width
        self._height = height
        self.budget_bytes = budget_bytes
        self._loaded: OrderedDict[str, LoadedAvatar] = OrderedDict()  # least recent first
        self._sizes: dict[str, int] = {}
        self._leases: Counter[str] = Counter()
        self._pinned: set[str] = set()
        self.evicted = 0
        self._lock = threading.RLock()  # the fields above; never held while loading
        self._load_lock = threading.Lock()  # one load at a time

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

    def _cached(self, avatar_id: str) -> LoadedAvatar | None:
        with self._lock:
            loaded = self._loaded.get(avatar_id)
            if loaded is not None:
                self._loaded.move_to_end(avatar_id)
            return loaded

    def get(self, avatar_id: str) -> LoadedAvatar:
        """The loaded avatar, loading it on first use. Raises NotFound for unknown ids."""
        if not AVATAR_ID_RE.fullmatch(avatar_id):
            raise NotFound(f"no avatar with id {avatar_id[:40]!r}")
        loaded = self._cached(avatar_id)
        if loaded is not None:
            return loaded
        with self._load_lock:
            loaded = self._cached(avatar_id)  # loaded by another thread meanwhile
            if loaded is not None:
                return loaded
            return self._load(avatar_id, keep=True)

    def _load(self, avatar_id: str, *, keep: bool) -> LoadedAvatar:
        """Load (holding ``_load_lock``): room is made first from the size the registry
        implies, then the avatar is counted at its measured size. ``keep``: stay loaded even
        when over the budget (the caller is about to use it)."""
        folder = self._folder(avatar_id)
        if folder is None:
            raise NotFound(f"no avatar with id {avatar_id!r}")
        need = self._estimate(avatar_id) or 0
        with self._lock:
            self._evict(need=need)
        try:
            avatar = load_avatar_dir(folder, width=self._width, height=self._height)
        except AvatarError:
            if self._folder(avatar_id) is None:  # deleted while loading
                raise NotFound(f"no avatar with id {avatar_id!r}") from None
            raise
        loaded = LoadedAvatar(avatar_id, avatar, FaceRenderer(avatar))
        size = avatar_bytes(loaded)
        with self._lock:
            self._loaded[avatar_id] = loaded
            self._sizes[avatar_id] = size
            self._evict(keep=avatar_id if keep else None)
        return loaded

    def _estimate(self, avatar_id: str) -> int | None:
        """Bytes the avatar's frames will take at the output size, from the registry (None:
        unknown). Registered videos hold their loop frames and the still image."""
        frame = self._width * self._height * 3
        if avatar_id == BUILTIN_ID:
            return frame
        record = self._store.get(avatar_id)
        if record is None:
            return None
        return frame * (record.frames + 1 if record.frames > 1 else 1)

    def preload(self, avatar_id: str) -> bool:
        """Load ``avatar_id`` ahead of its first call if it fits the budget beside the
        avatars calls hold (and the default); other unused ones make room, least recently
        used first. True when it is loaded afterwards. Blocking, like :meth:`get`."""
        if not AVATAR_ID_RE.fullmatch(avatar_id):
            raise NotFound(f"no avatar with id {avatar_id[:40]!r}")
        if self._cached(avatar_id) is not None:
            return True
        with self._load_lock:
            if self._cached(avatar_id) is not None:
                return True
            need = self._estimate(avatar_id)
            with self._lock:
                held = sum(size for key, size in self._sizes.items() if self._kept(key))
                budget = self.budget_bytes
            if budget is not None and need is not None and held + need > budget:
                logger.info("avatar %s not preloaded: %.0f MB does not fit "
                            "avatars.memory_budget_mb beside %.0f MB in use", avatar_id,
                            need / 1e6, held / 1e6)
                return False
            self._load(avatar_id, keep=False)
        with self._lock:
            return avatar_id in self._loaded

    def acquire(self, avatar_id: str) -> LoadedAvatar:
        """:meth:`get`, held for a call: never dropped until :meth:`release` (blocking)."""
        loaded = self.get(avatar_id)
        with self._lock:
            self._leases[avatar_id] += 1
            dropped = avatar_id not in self._loaded
        if dropped and self._folder(avatar_id) is not None:  # unloaded, not deleted, meanwhile
            size = avatar_bytes(loaded)
            with self._lock:
                if avatar_id not in self._loaded:  # counted again while the call holds it
                    self._loaded[avatar_id] = loaded
                    self._sizes[avatar_id] = size
        return loaded

    def pin(self, avatar_id: str) -> None:
        """Keep ``avatar_id`` loaded whatever the budget (the server's default avatar)."""
        with self._lock:
            self._pinned.add(avatar_id)

    def release(self, avatar_id: str) -> None:
        """A call no longer holds ``avatar_id``; the budget applies to it again."""
        with self._lock:
            if self._leases[avatar_id] > 0:
                self._leases[avatar_id] -= 1
            if self._leases[avatar_id] <= 0:
                del self._leases[avatar_id]
            self._evict()

    def forget(self, avatar_id: str) -> None:
        """Drop a loaded avatar (after it was deleted); sessions holding it keep their copy."""
        with self._lock:
            self._loaded.pop(avatar_id, None)
            self._sizes.pop(avatar_id, None)

    @property
    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def loaded_ids(self) -> list[str]:
        """The avatars in memory, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {"loaded": len(self._loaded), "bytes": self.loaded_bytes,
                    "budget_bytes": self.budget_bytes, "in_use": sorted(self._leases),
                    "evicted": self.evicted}

    def _kept(self, avatar_id: str) -> bool:
        """Pinned, or held by a call: never dropped."""
        return avatar_id in self._pinned or self._leases.get(avatar_id, 0) > 0

    def _evict(self, keep: str | None = None, need: int = 0) -> None:
        """Drop least recently used avatars no call holds until the rest, and ``need`` bytes
        more, fit the budget (holding ``_lock``)."""
        if self.budget_bytes is None:
            return
        for avatar_id in list(self._loaded):
            if self.loaded_bytes + need <= self.budget_bytes:
                return
            if avatar_id == keep or self._kept(avatar_id):
                continue
            del self._loaded[avatar_id]
            size = self._sizes.pop(avatar_id, 0)
            self.evicted += 1
            logger.info("avatar %s unloaded (%.0f MB; avatars.memory_budget_mb)", avatar_id,
                        size / 1e6)
