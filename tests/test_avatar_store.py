"""avatars/store.py: registry + folders per avatars/LAYOUT.md, atomic, restart-proof."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from avatars.model import load_avatar_dir
from avatars.store import AvatarStore, DuplicateSource, is_registered_id
from tests.fakes.prepare import FakeAnalyzer, FakePrepare, moving_frames, portrait_rgb


class Media:
    def __init__(self, frames, fps):
        self.frames = frames
        self.fps = fps


def prepared(frames, fps=25.0, crop_size=96):
    return FakePrepare()(Media(frames, fps), FakeAnalyzer(), crop_size=crop_size)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def folders(store: AvatarStore) -> list[str]:
    return sorted(p.name for p in store.avatars_dir.iterdir())


def test_image_avatar_layout_and_loadable(tmp_path):
    store = AvatarStore(tmp_path / "data")
    prep = prepared([portrait_rgb((320, 240))], fps=0.0)
    record = store.save(prep, name="  Alice  ", source_hash=sha("a"))
    assert is_registered_id(record.id)
    assert (record.name, record.frames, record.width, record.height) == ("Alice", 1, 320, 240)
    assert record.quality == {"face_px": 120.0, "sharpness": 123.4, "analyzer": "fake"}
    folder = tmp_path / "data" / "avatars" / record.id
    assert sorted(p.name for p in folder.iterdir()) == [
        "avatar.json", "crops_96.npy", "face_data.npz", "frame0.png", "masks_96.npz",
        "thumbnail.jpg",
    ]
    meta = json.loads((folder / "avatar.json").read_text())
    assert meta["id"] == record.id and meta["name"] == "Alice"
    assert meta["image"] == "frame0.png" and "loop_video" not in meta
    assert (meta["frames"], meta["width"], meta["height"], meta["crop_size"]) == (1, 320, 240, 96)
    assert meta["source_hash"] == sha("a") and meta["created"] == record.created
    assert np.allclose(meta["landmarks"], prep.landmarks[0], atol=0.01)
    with np.load(folder / "face_data.npz") as fd:
        assert fd["boxes"].shape == (1, 4) and fd["landmarks"].shape == (1, 68, 2)
        assert fd["landmarks"].dtype == np.float32
    assert np.array_equal(np.load(folder / "crops_96.npy"), prep.crops)
    with np.load(folder / "masks_96.npz") as masks:
        assert np.array_equal(masks["mouth"], prep.mouth_masks)
        assert np.array_equal(masks["face"], prep.face_masks)
    assert (folder / "thumbnail.jpg").read_bytes().startswith(b"\xff\xd8\xff")
    avatar = load_avatar_dir(folder, width=256, height=256)
    assert avatar.avatar_id == record.id and avatar.size == (256, 256)
    assert avatar.loop_frames == ()


@pytest.mark.parametrize("size", [(160, 120), (161, 121)])
def test_video_avatar_loop_matches_the_arrays_frame_for_frame(tmp_path, size):
    store = AvatarStore(tmp_path)
    frames = moving_frames(30, size)
    prep = prepared(frames, fps=25.0)
    record = store.save(prep, name="Bob", source_hash=sha("b"))
    folder = tmp_path / "avatars" / record.id
    meta = json.loads((folder / "avatar.json").read_text())
    assert (meta["loop_video"], meta["loop_mode"], meta["frames"], meta["fps"]) == (
        "loop.mp4", "cycle", 30, 25.0,
    )
    with av.open(str(folder / "loop.mp4")) as c:
        stream = c.streams.video[0]
        assert float(stream.average_rate) == pytest.approx(25.0)
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    assert len(decoded) == 30
    assert decoded[0].shape == (size[1], size[0], 3)  # odd sizes keep every pixel
    for i in (0, 13, 29):
        assert np.abs(decoded[i].astype(int) - frames[i].astype(int)).mean() < 4
    avatar = load_avatar_dir(folder, width=128, height=128)
    assert len(avatar.loop_frames) == 30 and len(avatar.loop_landmarks) == 30
    assert avatar.loop_mode == "cycle" and avatar.loop_fps == pytest.approx(25.0)


def test_get_list_find_and_restart(tmp_path):
    store = AvatarStore(tmp_path)
    a = store.save(prepared([portrait_rgb((64, 64))]), name="A", source_hash=sha("a"))
    b = store.save(prepared(moving_frames(3, (64, 64))), name="B", source_hash=sha("b"))
    assert store.get(a.id) == a and store.find_by_hash(sha("b")) == b
    assert store.find_by_hash(sha("c")) is None and store.get("av_000000000000") is None
    assert [r.id for r in store.list()] == [a.id, b.id]
    again = AvatarStore(tmp_path)  # a restart
    assert again.list() == [a, b]
    assert again.folder(b.id) == tmp_path / "avatars" / b.id
    assert again.thumbnail(a.id).startswith(b"\xff\xd8\xff")
    with sqlite3.connect(tmp_path / "registry.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        cols = [r[1] for r in conn.execute("PRAGMA table_info(avatars)")]
    assert cols == ["id", "name", "created", "source_hash", "frame_count", "fps", "width",
                    "height", "quality"]


def test_same_content_twice_is_refused_and_writes_nothing(tmp_path):
    store = AvatarStore(tmp_path)
    first = store.save(prepared([portrait_rgb((64, 64))]), name="A", source_hash=sha("x"))
    before = folders(store)
    with pytest.raises(DuplicateSource) as info:
        store.save(prepared([portrait_rgb((64, 64))]), name="B", source_hash=sha("x"))
    assert info.value.existing == first
    assert folders(store) == before and len(store.list()) == 1


def test_concurrent_saves_of_one_content_make_one_avatar(tmp_path):
    store = AvatarStore(tmp_path)
    prep = prepared(moving_frames(5, (64, 64)))
    results, errors = [], []
    barrier = threading.Barrier(4)

    def save(i):
        barrier.wait()
        try:
            results.append(AvatarStore(tmp_path).save(prep, name=f"n{i}", source_hash=sha("z")))
        except DuplicateSource as dup:
            errors.append(dup.existing)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1 and len(errors) == 3
    assert all(e.id == results[0].id for e in errors)
    assert [r.id for r in store.list()] == [results[0].id]
    assert folders(store) == [results[0].id]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import avatars.store as store_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "encode_loop", broken)
    store = AvatarStore(tmp_path)
    with pytest.raises(OSError):
        store.save(prepared(moving_frames(3, (64, 64))), name="A", source_hash=sha("a"))
    assert store.list() == [] and folders(store) == []


def test_malformed_prepared_data_is_refused_before_writing(tmp_path):
    store = AvatarStore(tmp_path)
    good = prepared(moving_frames(3, (64, 64)))
    bad = type(good)(**{**good.__dict__, "landmarks": good.landmarks[:2]})
    with pytest.raises(ValueError, match="landmarks"):
        store.save(bad, name="A", source_hash=sha("a"))
    with pytest.raises(ValueError, match="name"):
        store.save(good, name="   ", source_hash=sha("a"))
    with pytest.raises(ValueError, match="sha256"):
        store.save(good, name="A", source_hash="../../etc")
    assert not (tmp_path / "avatars").exists() or folders(store) == []
    assert store.list() == []


def test_landmarks_outside_the_frame_are_clipped_for_the_loader(tmp_path):
    store = AvatarStore(tmp_path)
    good = prepared([portrait_rgb((64, 64))])
    lm = good.landmarks.copy()
    lm[0, 8] = (30.0, 70.0)  # chin below the picture
    record = store.save(type(good)(**{**good.__dict__, "landmarks": lm}), name="A",
                        source_hash=sha("a"))
    folder = tmp_path / "avatars" / record.id
    assert json.loads((folder / "avatar.json").read_text())["landmarks"][8] == [30.0, 63.0]
    with np.load(folder / "face_data.npz") as fd:
        assert tuple(fd["landmarks"][0, 8]) == (30.0, 70.0)
    load_avatar_dir(folder, width=64, height=64)


def test_delete_removes_row_and_folder(tmp_path):
    store = AvatarStore(tmp_path)
    a = store.save(prepared([portrait_rgb((64, 64))]), name="A", source_hash=sha("a"))
    b = store.save(prepared([portrait_rgb((64, 64))]), name="B", source_hash=sha("b"))
    assert store.delete(a.id) is True
    assert store.get(a.id) is None and store.folder(a.id) is None
    assert folders(store) == [b.id]
    assert store.delete(a.id) is False
    # the content may be registered again once deleted
    again = store.save(prepared([portrait_rgb((64, 64))]), name="A", source_hash=sha("a"))
    assert again.id != a.id
    assert AvatarStore(tmp_path).list() == [b, again]


@pytest.mark.parametrize(
    "bad_id", ["../x", "..", "av_", "AV_0123456789ab", "av_0123456789AB", "av_0123456789abc",
               "av_0123456789ab\n", "default", "x" * 500, ""]
)
def test_odd_ids_are_never_looked_up(tmp_path, bad_id):
    store = AvatarStore(tmp_path / "nowhere")
    assert store.get(bad_id) is None
    assert store.folder(bad_id) is None
    assert store.thumbnail(bad_id) is None
    assert store.delete(bad_id) is False
    assert not (tmp_path / "nowhere").exists()


def test_reads_on_a_missing_data_dir_create_nothing(tmp_path):
    store = AvatarStore(tmp_path / "later")
    assert store.list() == [] and store.find_by_hash(sha("a")) is None
    assert store.get("av_0123456789ab") is None
    assert not (tmp_path / "later").exists()


def test_leftovers_of_crashes_are_cleaned_at_start(tmp_path):
    import os
    import time

    AvatarStore(tmp_path).list()
    store = AvatarStore(tmp_path)
    store.save(prepared([portrait_rgb((64, 64))]), name="A", source_hash=sha("a"))
    (tmp_path / "avatars" / ".del-av_0123456789ab-1234").mkdir()
    stale = tmp_path / "avatars" / ".tmp-av_0123456789ab-0000"
    fresh = tmp_path / "avatars" / ".tmp-av_0123456789ac-0000"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    AvatarStore(tmp_path).list()
    names = folders(store)
    assert ".tmp-av_0123456789ac-0000" in names
    assert not any(n.startswith(".del-") for n in names) and stale.name not in names
    assert Path(tmp_path / "avatars").is_dir()
