"""RenderCache: content-addressed entries, hit rate, LRU under a byte cap, TTL, cleanup."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import cast

import pytest

from pipeline.render.cache import ENTRY_FILE, MANIFEST_FILE, RenderCache
from tests.fakes.clock import FakeClock


def key_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def staged(cache: RenderCache, n_bytes: int = 1000, tag: str = "x") -> tuple[Path, dict]:
    """A staging folder holding a fake render of about ``n_bytes``."""
    staging = cache.staging_dir()
    (staging / "video.mp4").write_bytes(tag.encode() * n_bytes)
    (staging / "timeline.json").write_text('{"fps": 25}')
    manifest = {"files": {"video": "video.mp4", "timeline": "timeline.json"}, "tag": tag}
    return staging, manifest


def test_put_then_get_counts_hits_and_misses(tmp_path: Path) -> None:
    cache = RenderCache(tmp_path, max_bytes=1 << 20, ttl_s=3600)
    staging, manifest = staged(cache, tag="a")
    put = cache.put(key_of("a"), staging, manifest)

    assert not staging.exists()
    assert put.path == tmp_path / "entries" / key_of("a")
    assert (put.path / "video.mp4").read_bytes() == b"a" * 1000
    assert (put.path / MANIFEST_FILE).exists() and (put.path / ENTRY_FILE).exists()
    assert put.size >= 1000

    got = cache.get(key_of("a"))
    assert got is not None
    assert got.manifest == manifest
    assert got.path == put.path and got.size == put.size
    assert cache.get(key_of("b")) is None
    assert cache.get(key_of("a")) is not None
    assert cache.peek(key_of("b")) is None  # peek does not count

    stats = cache.stats()
    assert stats["entries"] == 1
    assert stats["bytes"] == put.size
    assert (stats["hits"], stats["misses"]) == (2, 1)
    assert stats["hit_rate"] == pytest.approx(2 / 3)
    assert stats["max_bytes"] == 1 << 20 and stats["ttl_s"] == 3600


def test_hit_rate_is_zero_before_any_lookup(tmp_path: Path) -> None:
    stats = RenderCache(tmp_path, max_bytes=1 << 20, ttl_s=60).stats()
    assert (stats["entries"], stats["bytes"], stats["hit_rate"]) == (0, 0, 0.0)


def test_lru_evicts_the_least_recently_used_beyond_the_cap(tmp_path: Path) -> None:
    clock = FakeClock()
    probe = RenderCache(tmp_path / "probe", max_bytes=1 << 20, ttl_s=3600, clock=clock)
    one = probe.put(key_of("probe"), *staged(probe, tag="p")).size
    cache = RenderCache(tmp_path / "c", max_bytes=2 * one + one // 2, ttl_s=3600, clock=clock)

    for name in ("a", "b"):
        cache.put(key_of(name), *staged(cache, tag=name))
        clock.advance(1)
    assert cache.get(key_of("a")) is not None  # a used after b: b is now least recent
    clock.advance(1)
    cache.put(key_of("c"), *staged(cache, tag="c"))

    assert cache.peek(key_of("b")) is None
    assert cache.peek(key_of("a")) is not None
    assert cache.peek(key_of("c")) is not None
    assert cast(int, cache.stats()["bytes"]) <= cache.max_bytes

    # Without the get, the oldest put would have gone instead.
    clock.advance(1)
    cache.put(key_of("d"), *staged(cache, tag="d"))
    assert cache.peek(key_of("a")) is None
    assert {k for k in ("c", "d") if cache.peek(key_of(k))} == {"c", "d"}


def test_an_entry_larger_than_the_cap_stays_alone(tmp_path: Path) -> None:
    cache = RenderCache(tmp_path, max_bytes=1500, ttl_s=3600, clock=FakeClock())
    cache.put(key_of("small"), *staged(cache, 100, tag="s"))
    big = cache.put(key_of("big"), *staged(cache, 5000, tag="b"))
    assert cache.peek(key_of("big")) == big
    assert cache.peek(key_of("small")) is None


def test_ttl_expiry_is_a_miss_and_removes_the_entry(tmp_path: Path) -> None:
    clock = FakeClock()
    cache = RenderCache(tmp_path, max_bytes=1 << 20, ttl_s=100, clock=clock)
    entry = cache.put(key_of("a"), *staged(cache))
    clock.advance(99)
    assert cache.get(key_of("a")) is not None  # a hit does not extend the lifetime
    clock.advance(2)
    assert cache.get(key_of("a")) is None
    assert not entry.path.exists()
    assert cache.stats()["misses"] == 1 and cache.stats()["entries"] == 0


def test_clear_removes_every_entry_but_not_staging(tmp_path: Path) -> None:
    cache = RenderCache(tmp_path, max_bytes=1 << 20, ttl_s=3600)
    for name in ("a", "b", "c"):
        cache.put(key_of(name), *staged(cache, tag=name))
    running, _ = staged(cache)
    assert cache.clear() == 3
    assert cache.stats()["entries"] == 0
    assert cache.get(key_of("a")) is None
    assert running.exists()
    assert cache.clear() == 0


def test_cleanup_removes_expired_entries_and_old_staging(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    cache = RenderCache(tmp_path, max_bytes=1 << 20, ttl_s=600, clock=clock)
    old = cache.put(key_of("old"), *staged(cache, tag="o"))
    clock.advance(500)
    cache.put(key_of("new"), *staged(cache, tag="n"))
    abandoned, _ = staged(cache)
    hour_ago = time.time() - 3700
    for path in (abandoned, *abandoned.iterdir()):
        os.utime(path, (hour_ago, hour_ago))
    fresh, _ = staged(cache)
    clock.advance(200)  # old is 700 s old, new 200 s

    report = cache.cleanup()

    assert report["expired"] == 1
    assert report["evicted"] == 0
    assert report["bytes_freed"] == old.size
    assert report["staging_removed"] == 1
    assert not abandoned.exists() and fresh.exists()
    assert cache.peek(key_of("old")) is None and cache.peek(key_of("new")) is not None


def test_cleanup_evicts_down_to_a_lowered_cap(tmp_path: Path) -> None:
    clock = FakeClock()
    big = RenderCache(tmp_path, max_bytes=1 << 20, ttl_s=3600, clock=clock)
    sizes = []
    for name in ("a", "b", "c"):
        sizes.append(big.put(key_of(name), *staged(big, tag=name)).size)
        clock.advance(1)
    small = RenderCache(tmp_path, max_bytes=sizes[0] + 10, ttl_s=3600, clock=clock)
    report = small.cleanup()
    assert (report["evicted"], report["expired"]) == (2, 0)
    assert report["bytes_freed"] == sizes[0] + sizes[1]
    assert small.peek(key_of("c")) is not None


@pytest.mark.parametrize(
    "bad", ["", "abc", "../" + "0" * 61, key_of("a").upper(), key_of("a") + "0", "g" * 64]
)
def test_a_bad_key_is_refused(tmp_path: Path, bad: str) -> None:
    cache = RenderCache(tmp_path, max_bytes=1 << 20, ttl_s=60)
    with pytest.raises(ValueError, match="sha256"):
        cache.get(bad)
    with pytest.raises(ValueError, match="sha256"):
        cache.peek(bad)
    staging, manifest = staged(cache)
    with pytest.raises(ValueError, match="sha256"):
        cache.put(bad, staging, manifest)
    assert staging.exists()
    assert list((tmp_path / "entries").iterdir()) == []


def test_discard_only_removes_staging_folders(tmp_path: Path) -> None:
    cache = RenderCache(tmp_path / "c", max_bytes=1 << 20, ttl_s=60)
    staging, _ = staged(cache)
    cache.discard(staging)
    assert not staging.exists()
    cache.discard(staging)  # already gone: fine
    outside = tmp_path / "precious"
    outside.mkdir()
    with pytest.raises(ValueError):
        cache.discard(outside)
    assert outside.exists()


def test_put_of_an_existing_key_keeps_one_entry(tmp_path: Path) -> None:
    clock = FakeClock()
    cache = RenderCache(tmp_path, max_bytes=1 << 20, ttl_s=3600, clock=clock)
    first = cache.put(key_of("a"), *staged(cache, tag="1"))
    clock.advance(5)
    second_staging, manifest = staged(cache, tag="2")
    second = cache.put(key_of("a"), second_staging, manifest)
    assert second.created == first.created
    assert second.manifest["tag"] == "1"
    assert (second.path / "video.mp4").read_bytes().startswith(b"1")
    assert not second_staging.exists()
    assert cache.stats()["entries"] == 1
    assert list((tmp_path / "staging").iterdir()) == []


def test_two_cache_objects_on_one_folder_share_entries_and_recency(tmp_path: Path) -> None:
    clock = FakeClock()
    probe = RenderCache(tmp_path / "probe", max_bytes=1 << 20, ttl_s=3600, clock=clock)
    one = probe.put(key_of("probe"), *staged(probe, tag="p")).size
    api = RenderCache(tmp_path / "c", max_bytes=2 * one + one // 2, ttl_s=3600, clock=clock)
    worker = RenderCache(tmp_path / "c", max_bytes=2 * one + one // 2, ttl_s=3600, clock=clock)

    worker.put(key_of("a"), *staged(worker, tag="a"))
    clock.advance(1)
    worker.put(key_of("b"), *staged(worker, tag="b"))
    clock.advance(1)
    seen = api.get(key_of("a"))  # the API's hit makes a recent for the worker's eviction too
    assert seen is not None and seen.manifest["tag"] == "a"
    assert api.stats()["entries"] == 2
    clock.advance(1)
    worker.put(key_of("c"), *staged(worker, tag="c"))

    assert api.peek(key_of("b")) is None
    assert api.peek(key_of("a")) is not None and api.peek(key_of("c")) is not None
    assert api.stats()["hits"] == 1 and worker.stats()["hits"] == 0
