"""Content-addressed cache of rendered results: one folder per key, LRU under a byte cap, a TTL.

Layout under ``root``::

    entries/<key>/          one finished result: the rendered files, manifest.json, entry.json
    staging/<random>/       results being rendered (moved into entries/ by a rename when done)
    trash/<random>/         entries being deleted (renamed here first, then removed)

Every change to ``entries/`` is a single ``rename``, so a reader in any process sees a whole
entry or none. ``entry.json`` holds the key, the creation time and the size in bytes; its
modification time is the entry's last use. Recency lives on the file itself, not in a shared
index: it needs no lock, works the same for several worker processes and the API on one
machine or on a shared volume (where SQLite's locking is unreliable), and costs one
``utime`` per hit. Eviction scans ``entries/`` (a few thousand folders at most under any
sensible cap). Hit and miss counters are per process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"
MANIFEST_FILE = "manifest.json"
STAGING_MAX_AGE_S = 3600.0
_KEY_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A finished result. path: its folder; created: Unix time s; size: bytes of its files
    (entry.json aside)."""

    key: str
    path: Path
    manifest: dict[str, object]
    created: float
    size: int


@dataclass(frozen=True, slots=True)
class _Meta:
    created: float
    size: int
    last_used: float


def check_key(key: str) -> str:
    """Return ``key`` if it is a lowercase hex sha256 digest; raise ValueError otherwise."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError("cache key must be 64 lowercase hex digits (sha256)")
    return key


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


class RenderCache:
    """The cache folder ``root``. max_bytes: size cap; ttl_s: entry lifetime from creation.

    ``clock`` gives Unix time in seconds (injected in tests). Methods do blocking file I/O:
    call them from a worker thread, not the event loop, when entries are large or many.
    Safe to share between threads; several processes may share ``root``.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries = self.root / "entries"
        self._staging = self.root / "staging"
        self._trash = self.root / "trash"
        for folder in (self._entries, self._staging, self._trash):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    # ------------------------------------------------------------------ lookups

    def get(self, key: str) -> CacheEntry | None:
        """The entry for ``key`` or None (expired entries are removed and count as misses).
        Counts a hit or a miss and marks the entry as just used."""
        entry = self._load(check_key(key))
        with self._lock:
            if entry is None:
                self._misses += 1
            else:
                self._hits += 1
        if entry is not None:
            now = self._clock()
            with contextlib.suppress(OSError):
                os.utime(entry.path / ENTRY_FILE, (now, now))
        return entry

    def peek(self, key: str) -> CacheEntry | None:
        """Like :meth:`get` without counting or touching recency (expired entries still go)."""
        return self._load(check_key(key))

    def _load(self, key: str) -> CacheEntry | None:
        path = self._entries / key
        try:
            meta = json.loads((path / ENTRY_FILE).read_text())
            manifest = json.loads((path / MANIFEST_FILE).read_text())
            created, size = float(meta["created"]), int(meta["size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if self._clock() - created > self.ttl_s:
            self._remove(key)
            return None
        return CacheEntry(key=key, path=path, manifest=manifest, created=created, size=size)

    # ------------------------------------------------------------------ writing

    def staging_dir(self) -> Path:
        """A new empty folder under ``root/staging`` to render into."""
        path = self._staging / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def put(self, key: str, staging: Path, manifest: dict[str, object]) -> CacheEntry:
        """Move ``staging`` into place as the entry for ``key`` (one rename), then evict least
        recently used entries beyond ``max_bytes`` (never this one). When a live entry for
        ``key`` exists it wins and ``staging`` is removed."""
        check_key(key)
        staging = Path(staging)
        existing = self.peek(key)
        if existing is not None:
            self.discard(staging)
            return existing
        now = self._clock()
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, sort_keys=True))
        size = _tree_size(staging)
        entry_file = staging / ENTRY_FILE
        entry_file.write_text(json.dumps({"key": key, "created": now, "size": size}))
        os.utime(entry_file, (now, now))
        target = self._entries / key
        try:
            os.rename(staging, target)
        except OSError:
            # Another process put the same key first (or an expired one is in the way).
            current = self.peek(key)
            if current is not None:
                self.discard(staging)
                return current
            self._remove(key)  # an unreadable leftover
            os.rename(staging, target)
        entry = CacheEntry(key=key, path=target, manifest=dict(manifest), created=now, size=size)
        self._enforce(keep=key)
        return entry

    def discard(self, staging: Path) -> None:
        """Remove a staging folder (after a cancel or a failure); missing is fine."""
        staging = Path(staging)
        if staging.resolve().parent != self._staging.resolve():
            raise ValueError("not a staging folder of this cache")
        shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------------ housekeeping

    def stats(self) -> dict[str, object]:
        """{entries, bytes, hits, misses, hit_rate, max_bytes, ttl_s}; hits and misses count
        this process's lookups since start (hit_rate 0.0 before any)."""
        metas = self._scan()
        with self._lock:
            hits, misses = self._hits, self._misses
        lookups = hits + misses
        return {
            "entries": len(metas),
            "bytes": sum(m.size for m in metas.values()),
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / lookups if lookups else 0.0,
            "max_bytes": self.max_bytes,
            "ttl_s": self.ttl_s,
        }

    def clear(self) -> int:
        """Remove every entry (staging folders of running renders stay); returns how many."""
        removed = 0
        for key in self._scan():
            if self._remove(key):
                removed += 1
        return removed

    def cleanup(self) -> dict[str, int]:
        """Remove expired entries, evict beyond the cap, remove staging folders untouched for
        an hour and leftovers in trash. Returns {expired, evicted, bytes_freed,
        staging_removed}."""
        result = self._enforce(keep=None)
        now = self._clock()
        staging_removed = 0
        for folder in (self._staging, self._trash):
            for child in _children(folder):
                try:
                    age = now - _newest_mtime(child)
                except OSError:
                    continue
                if folder is self._trash or age > STAGING_MAX_AGE_S:
                    shutil.rmtree(child, ignore_errors=True)
                    if folder is self._staging:
                        staging_removed += 1
        result["staging_removed"] = staging_removed
        return result

    def _enforce(self, *, keep: str | None) -> dict[str, int]:
        """Drop expired entries, then least recently used ones while over the cap."""
        now = self._clock()
        metas = self._scan()
        expired = evicted = freed = 0
        for key, meta in list(metas.items()):
            if key != keep and now - meta.created > self.ttl_s:
                del metas[key]
                if self._remove(key):
                    expired += 1
                    freed += meta.size
        total = sum(m.size for m in metas.values())
        order = sorted(
            (k for k in metas if k != keep),
            key=lambda k: (metas[k].last_used, metas[k].created, k),
        )
        for key in order:
            if total <= self.max_bytes:
                break
            total -= metas[key].size
            if self._remove(key):
                evicted += 1
                freed += metas[key].size
                logger.info("cache: evicted %s (%d bytes)", key[:12], metas[key].size)
        return {"expired": expired, "evicted": evicted, "bytes_freed": freed}

    def _scan(self) -> dict[str, _Meta]:
        metas: dict[str, _Meta] = {}
        for child in _children(self._entries):
            if not _KEY_RE.fullmatch(child.name):
                continue
            entry_file = child / ENTRY_FILE
            try:
                last_used = entry_file.stat().st_mtime
                meta = json.loads(entry_file.read_text())
                metas[child.name] = _Meta(float(meta["created"]), int(meta["size"]), last_used)
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return metas

    def _remove(self, key: str) -> bool:
        """Rename the entry into trash (atomic for readers), then delete it."""
        target = self._trash / uuid.uuid4().hex
        try:
            os.rename(self._entries / key, target)
        except OSError:
            return False  # already gone (another process removed it)
        shutil.rmtree(target, ignore_errors=True)
        return True


def _children(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
