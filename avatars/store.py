"""Registered avatars on disk: a SQLite registry plus one folder per avatar (avatars/LAYOUT.md).

``<data_dir>/registry.sqlite3`` holds one row per avatar (WAL journal; a new connection per
call, so the store can be used from any thread and by several processes at once, e.g. the
server and ``python -m avatars``). ``<data_dir>/avatars/<id>/`` holds the prepared assets.

An avatar appears atomically: its folder is written under a temporary name, the registry row
is inserted, the folder is renamed into place and only then is the row committed. A failure
at any step leaves nothing behind (a crash may leave a ``.tmp-*`` folder, removed later).
The registry's UNIQUE ``source_hash`` guarantees one avatar per uploaded content.

Nothing here touches the file system until it is needed: a store over a data directory that
does not exist yet simply has no avatars.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from avatars.media_output import encode_loop, make_thumbnail

__all__ = [
    "AVATAR_ID_RE",
    "AvatarRecord",
    "AvatarStore",
    "DuplicateSource",
    "PreparedLike",
    "is_registered_id",
    "new_avatar_id",
]

# Server-generated ids: "av_" + 12 lowercase hex digits. Anything else is never looked up.
AVATAR_ID_RE = re.compile(r"^av_[0-9a-f]{12}$")
REGISTRY_FILE = "registry.sqlite3"
AVATARS_DIR = "avatars"
MAX_NAME_CHARS = 100
_STALE_TMP_S = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS avatars (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created     TEXT NOT NULL,
    source_hash TEXT NOT NULL UNIQUE,
    frame_count INTEGER NOT NULL,
    fps         REAL NOT NULL,
    width       INTEGER NOT NULL,
    height      INTEGER NOT NULL,
    quality     TEXT NOT NULL
)
"""
_COLUMNS = "id, name, created, source_hash, frame_count, fps, width, height, quality"

Rgb = npt.NDArray[np.uint8]


def is_registered_id(avatar_id: object) -> bool:
    """True for a well-formed registered-avatar id (says nothing about existence)."""
    return isinstance(avatar_id, str) and AVATAR_ID_RE.fullmatch(avatar_id) is not None


def new_avatar_id() -> str:
    return "av_" + secrets.token_hex(6)


class PreparedLike(Protocol):
    """What the store needs of ``avatars.prepare.PreparedAvatar``."""

    @property
    def frames(self) -> Sequence[Rgb]: ...
    @property
    def fps(self) -> float: ...
    @property
    def boxes(self) -> npt.NDArray[np.float32]: ...
    @property
    def landmarks(self) -> npt.NDArray[np.float32]: ...
    @property
    def crops(self) -> npt.NDArray[np.uint8]: ...
    @property
    def mouth_masks(self) -> npt.NDArray[np.uint8]: ...
    @property
    def face_masks(self) -> npt.NDArray[np.uint8]: ...
    @property
    def thumbnail_jpeg(self) -> bytes: ...
    @property
    def quality(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class AvatarRecord:
    """One registry row."""

    id: str
    name: str
    created: str  # ISO 8601, UTC
    source_hash: str  # sha256 of the uploaded bytes, hex
    frames: int
    fps: float
    width: int
    height: int
    quality: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the API and the CLI (the timestamp is ``created_at``)."""
        return {
            "id": self.id,
            "name": self.name,
            "frames": self.frames,
            "fps": self.fps,
            "width": self.width,
            "height": self.height,
            "quality": self.quality,
            "created_at": self.created,
            "source_hash": self.source_hash,
        }


class DuplicateSource(Exception):
    """The same content is already registered (the registry's UNIQUE source_hash)."""

    def __init__(self, existing: AvatarRecord) -> None:
        super().__init__(f"content already registered as {existing.id}")
        self.existing = existing


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _plain_json(value: Mapping[str, Any]) -> dict[str, Any]:
    """``value`` as plain JSON data (numpy scalars/arrays converted)."""
    out = json.loads(json.dumps(dict(value), default=_json_default))
    assert isinstance(out, dict)
    return out


def _row_to_record(row: Sequence[Any]) -> AvatarRecord:
    try:
        quality = json.loads(row[8])
    except (TypeError, ValueError):
        quality = {}
    return AvatarRecord(
        id=str(row[0]),
        name=str(row[1]),
        created=str(row[2]),
        source_hash=str(row[3]),
        frames=int(row[4]),
        fps=float(row[5]),
        width=int(row[6]),
        height=int(row[7]),
        quality=quality if isinstance(quality, dict) else {},
    )


@dataclass(frozen=True, slots=True)
class _Checked:
    """The prepared arrays, validated and normalised."""

    frames: list[Rgb]
    fps: float
    boxes: npt.NDArray[np.float32]
    landmarks: npt.NDArray[np.float32]
    crops: npt.NDArray[np.uint8]
    mouth: npt.NDArray[np.uint8]
    face: npt.NDArray[np.uint8]
    crop_size: int
    thumbnail: bytes
    quality: dict[str, Any]

    @property
    def width(self) -> int:
        return int(self.frames[0].shape[1])

    @property
    def height(self) -> int:
        return int(self.frames[0].shape[0])


def _check(prepared: PreparedLike) -> _Checked:
    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in prepared.frames]
    if not frames:
        raise ValueError("prepared avatar has no frames")
    n = len(frames)
    shape = frames[0].shape
    if len(shape) != 3 or shape[2] != 3 or shape[0] < 2 or shape[1] < 2:
        raise ValueError(f"frames must be HxWx3, got {shape}")
    if any(f.shape != shape for f in frames):
        raise ValueError("all frames must have the same size")
    fps = float(prepared.fps)
    if n > 1 and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"a {n}-frame loop needs fps > 0, got {prepared.fps!r}")
    if not math.isfinite(fps) or fps < 0:
        fps = 0.0
    boxes = np.asarray(prepared.boxes, dtype=np.float32)
    landmarks = np.asarray(prepared.landmarks, dtype=np.float32)
    crops = np.ascontiguousarray(prepared.crops, dtype=np.uint8)
    mouth = np.ascontiguousarray(prepared.mouth_masks, dtype=np.uint8)
    face = np.ascontiguousarray(prepared.face_masks, dtype=np.uint8)
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes must be ({n}, 4), got {boxes.shape}")
    if landmarks.shape != (n, 68, 2) or not np.all(np.isfinite(landmarks)):
        raise ValueError(f"landmarks must be finite ({n}, 68, 2), got {landmarks.shape}")
    if crops.ndim != 4 or crops.shape[0] != n or crops.shape[3] != 3 or (
        crops.shape[1] != crops.shape[2]
    ):
        raise ValueError(f"crops must be ({n}, S, S, 3), got {crops.shape}")
    size = int(crops.shape[1])
    for what, arr in (("mouth_masks", mouth), ("face_masks", face)):
        if arr.shape != (n, size, size):
            raise ValueError(f"{what} must be ({n}, {size}, {size}), got {arr.shape}")
    thumbnail = bytes(prepared.thumbnail_jpeg or b"")
    if not thumbnail.startswith(b"\xff\xd8\xff"):
        thumbnail = make_thumbnail(frames[0])
    return _Checked(
        frames=frames,
        fps=fps,
        boxes=boxes,
        landmarks=landmarks,
        crops=crops,
        mouth=mouth,
        face=face,
        crop_size=size,
        thumbnail=thumbnail,
        quality=_plain_json(prepared.quality or {}),
    )


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _set_wal(conn: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """Switch the registry to WAL. SQLite answers "database is locked" at once, without its
    busy handler, while another process or thread is switching or creating the same file:
    retry briefly, as the busy timeout would."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class AvatarStore:
    """The registry and the avatar folders under ``data_dir``. Thread-safe; blocking (call it
    from an executor in async code)."""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir)
        self.db_path = self.data_dir / REGISTRY_FILE
        self.avatars_dir = self.data_dir / AVATARS_DIR
        self._init_lock = threading.Lock()
        self._initialised = False

    # ------------------------------------------------------------------ plumbing

    def _init(self) -> None:
        with self._init_lock:
            if self._initialised:
                return
            self.avatars_dir.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(self._open()) as conn:
                _set_wal(conn)
                conn.execute(_SCHEMA)
            self._remove_leftovers()
            self._initialised = True

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.db_path), timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection | None]:
        """A connection, or None while no registry exists (nothing is created for a read)."""
        if not self._initialised:
            if not self.db_path.is_file():
                yield None
                return
            self._init()
        with contextlib.closing(self._open()) as conn:
            yield conn

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A connection inside BEGIN IMMEDIATE; committed on success, rolled back otherwise."""
        self._init()
        with contextlib.closing(self._open()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _remove_leftovers(self) -> None:
        """Folders of deletions (any age) and of saves that crashed (older than an hour)."""
        now = time.time()
        for entry in self.avatars_dir.iterdir():
            try:  # another process may rename or remove the entry meanwhile
                stale = entry.name.startswith(".tmp-") and (
                    now - entry.stat().st_mtime > _STALE_TMP_S
                )
            except OSError:
                continue
            if entry.name.startswith(".del-") or stale:
                shutil.rmtree(entry, ignore_errors=True)

    def _one(self, sql: str, args: tuple[Any, ...]) -> AvatarRecord | None:
        with self._reading() as conn:
            if conn is None:
                return None
            row = conn.execute(sql, args).fetchone()
        return None if row is None else _row_to_record(row)

    # ------------------------------------------------------------------ queries

    def get(self, avatar_id: str) -> AvatarRecord | None:
        if not is_registered_id(avatar_id):
            return None
        return self._one(f"SELECT {_COLUMNS} FROM avatars WHERE id = ?", (avatar_id,))

    def find_by_hash(self, source_hash: str) -> AvatarRecord | None:
        return self._one(f"SELECT {_COLUMNS} FROM avatars WHERE source_hash = ?", (source_hash,))

    def list(self) -> list[AvatarRecord]:
        """Every registered avatar, oldest first."""
        with self._reading() as conn:
            if conn is None:
                return []
            rows = conn.execute(f"SELECT {_COLUMNS} FROM avatars ORDER BY created, id").fetchall()
        return [_row_to_record(r) for r in rows]

    def folder(self, avatar_id: str) -> Path | None:
        """The folder of a registered avatar, or None (unknown or malformed id)."""
        if self.get(avatar_id) is None:
            return None
        path = self.avatars_dir / avatar_id
        return path if (path / "avatar.json").is_file() else None

    def thumbnail(self, avatar_id: str) -> bytes | None:
        path = self.folder(avatar_id)
        if path is None:
            return None
        try:
            return (path / "thumbnail.jpg").read_bytes()
        except OSError:
            return None

    # ------------------------------------------------------------------ changes

    def save(
        self,
        prepared: PreparedLike,
        *,
        name: str,
        source_hash: str,
        progress: Callable[[float], None] | None = None,
    ) -> AvatarRecord:
        """Store a prepared avatar; returns its new record.

        Raises DuplicateSource when ``source_hash`` is already registered (nothing is
        written), ValueError for malformed prepared data."""
        name = name.strip()
        if not 1 <= len(name) <= MAX_NAME_CHARS:
            raise ValueError(f"name must be 1..{MAX_NAME_CHARS} characters")
        if not re.fullmatch(r"[0-9a-f]{64}", source_hash):
            raise ValueError("source_hash must be a sha256 hex digest")
        checked = _check(prepared)
        existing = self.find_by_hash(source_hash)
        if existing is not None:
            raise DuplicateSource(existing)
        self._init()
        avatar_id = new_avatar_id()
        record = AvatarRecord(
            id=avatar_id,
            name=name,
            created=_utc_now(),
            source_hash=source_hash,
            frames=len(checked.frames),
            fps=checked.fps,
            width=checked.width,
            height=checked.height,
            quality=checked.quality,
        )
        tmp = self.avatars_dir / f".tmp-{avatar_id}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            self._write_folder(tmp, record, checked, progress)
            self._commit(tmp, record)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return record

    def _commit(self, tmp: Path, record: AvatarRecord) -> None:
        final = self.avatars_dir / record.id
        renamed = False
        try:
            with self._writing() as conn:
                conn.execute(
                    f"INSERT INTO avatars ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.name,
                        record.created,
                        record.source_hash,
                        record.frames,
                        record.fps,
                        record.width,
                        record.height,
                        json.dumps(record.quality),
                    ),
                )
                os.rename(tmp, final)  # fails if final exists: never overwrite
                renamed = True
        except BaseException as exc:
            if renamed:  # the commit failed after the rename
                shutil.rmtree(final, ignore_errors=True)
            if isinstance(exc, sqlite3.IntegrityError):
                existing = self.find_by_hash(record.source_hash)
                if existing is not None:
                    raise DuplicateSource(existing) from None
            raise

    def _write_folder(
        self,
        folder: Path,
        record: AvatarRecord,
        checked: _Checked,
        progress: Callable[[float], None] | None,
    ) -> None:
        first = checked.frames[0]
        ok, png = cv2.imencode(".png", cv2.cvtColor(first, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError("cannot encode frame 0 as PNG")
        (folder / "frame0.png").write_bytes(png.tobytes())
        video = len(checked.frames) > 1
        if video:
            encode_loop(folder / "loop.mp4", checked.frames, checked.fps, progress)
        np.savez(folder / "face_data.npz", boxes=checked.boxes, landmarks=checked.landmarks)
        S = checked.crop_size
        np.save(folder / f"crops_{S}.npy", checked.crops)
        np.savez_compressed(folder / f"masks_{S}.npz", mouth=checked.mouth, face=checked.face)
        (folder / "thumbnail.jpg").write_bytes(checked.thumbnail)
        # The loader refuses landmarks outside the image; a face touching the border keeps
        # its exact points in face_data.npz and clipped ones here.
        lm0 = checked.landmarks[0].astype(np.float64)
        lm0[:, 0] = np.clip(lm0[:, 0], 0.0, record.width - 1.0)
        lm0[:, 1] = np.clip(lm0[:, 1], 0.0, record.height - 1.0)
        meta: dict[str, Any] = {
            "id": record.id,
            "name": record.name,
            "image": "frame0.png",
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in lm0],
        }
        if video:
            meta["loop_video"] = "loop.mp4"
            meta["loop_mode"] = "cycle"
        meta.update(
            {
                "fps": record.fps,
                "frames": record.frames,
                "width": record.width,
                "height": record.height,
                "crop_size": S,
                "source_hash": record.source_hash,
                "quality": record.quality,
                "created": record.created,
            }
        )
        (folder / "avatar.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    def delete(self, avatar_id: str) -> bool:
        """Remove an avatar's row and folder; False when there is no such avatar."""
        if not is_registered_id(avatar_id) or self.get(avatar_id) is None:
            return False
        final = self.avatars_dir / avatar_id
        doomed = self.avatars_dir / f".del-{avatar_id}-{secrets.token_hex(4)}"
        with self._writing() as conn:
            cursor = conn.execute("DELETE FROM avatars WHERE id = ?", (avatar_id,))
            if cursor.rowcount == 0:
                return False
            if final.exists():
                os.rename(final, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return True
