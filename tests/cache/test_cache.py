"""Cache-aside against real Redis: TTLs, versioned tags, stampede protection, statistics."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from typing import Any

import pytest

from taskyard.cache.core import Cache, cache_for, cache_stats, cached
from taskyard.errors import CacheError, ConfigurationError
from taskyard.runtime import runtime_of


def _cache(make_app: Any, **cache_settings: Any) -> Cache:
    app = make_app("cache-test", cache=cache_settings) if cache_settings else make_app("cache-test")
    return cache_for(app)


def test_set_get_uses_resource_ttl(make_app: Any, redis_client: Any) -> None:
    cache = _cache(make_app)
    cache.set("user", "u1", {"name": "Ada"})
    assert cache.get("user", "u1") == {"name": "Ada"}
    assert cache.get("user", "nope", default="d") == "d"
    key = cache.keys.cache_value("user", "u1")
    # user TTL 1800 s plus the stale grace (60 s) in Redis.
    assert 1800 < redis_client.ttl(key) <= 1860
    cache.set("beneficiary", "b1", 1)
    assert 600 < redis_client.ttl(cache.keys.cache_value("beneficiary", "b1")) <= 660
    cache.set("x", "k", 1, ttl=5)
    assert redis_client.ttl(cache.keys.cache_value("x", "k")) <= 65


def test_unknown_resource_and_bad_values(make_app: Any) -> None:
    cache = _cache(make_app)
    with pytest.raises(ConfigurationError, match="TASKYARD_CACHE__TTL_S"):
        cache.set("n", "k", 1, resource="spaceship")
    with pytest.raises(CacheError, match="set"):
        cache.set("n", "k", {1, 2})
    with pytest.raises(CacheError, match="> 0"):
        cache.set("n", "k", 1, ttl=0)
    with pytest.raises(ConfigurationError, match="names no argument"):
        cached(tags=["user:{nobody}"])(lambda user_id: user_id)
    with pytest.raises(ConfigurationError):
        cached(ttl=-1)


def test_tag_invalidation_is_one_key_per_tag(make_app: Any, redis_client: Any) -> None:
    cache = _cache(make_app)
    for i in range(50):
        cache.set("user", f"u{i}", i, tags=["users", f"user:{i}"])
    assert cache.get("user", "u3", tags=["users"]) == 3
    cache.invalidate("user:3")
    assert cache.get("user", "u3") is None  # tag versions found from the entry itself
    assert cache.get("user", "u4") == 4
    for _ in range(20):
        cache.invalidate("users")
    assert all(cache.get("user", f"u{i}") is None for i in range(50))
    tag_keys = list(redis_client.scan_iter(match=cache.keys.cache_tag_version("*")))
    # One counter per invalidated tag ("users", "user:3"); 21 invalidations added no keys.
    assert len(tag_keys) == 2


def test_cached_decorator_args_tags_and_invalidate(make_app: Any) -> None:
    app = make_app("cache-test")
    calls: list[int] = []

    @cached(resource="user", tags=["users", "user:{user_id}"], app=app)
    def profile(user_id: int, full: bool = False) -> dict[str, Any]:
        calls.append(user_id)
        return {"id": user_id, "full": full}

    assert profile(1) == {"id": 1, "full": False}
    assert profile(1) == {"id": 1, "full": False}
    assert profile(user_id=1) == {"id": 1, "full": False}  # same key however it is called
    assert profile(1, True) == {"id": 1, "full": True}
    assert calls == [1, 1]
    cache_for(app).invalidate("user:1")
    profile(1)
    assert calls == [1, 1, 1]
    assert profile.invalidate(1) is True  # type: ignore[attr-defined]
    profile(1)
    assert calls == [1, 1, 1, 1]


def _concurrent(n: int, fn: Any) -> list[Any]:
    results: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = fn()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_stampede_one_computation_for_concurrent_readers(make_app: Any) -> None:
    app = make_app("cache-test")
    computations: list[float] = []
    lock = threading.Lock()
    version = {"v": 1}

    @cached(ttl=60, tags=["report"], app=app)
    def report() -> int:
        with lock:
            computations.append(time.monotonic())
        time.sleep(0.3)
        return version["v"]

    assert _concurrent(20, report) == [1] * 20
    assert len(computations) == 1
    # After invalidation every reader waits for the one recomputation: nobody sees the old value.
    version["v"] = 2
    cache_for(app).invalidate("report")
    assert _concurrent(20, report) == [2] * 20
    assert len(computations) == 2


def test_expired_entry_served_stale_while_one_recomputes(make_app: Any) -> None:
    app = make_app("cache-test")
    computations: list[int] = []
    version = {"v": 1}

    @cached(ttl=0.3, app=app)
    def settings_blob() -> int:
        computations.append(version["v"])
        time.sleep(1.0)  # long enough that every reader arrives during the recomputation
        return version["v"]

    assert settings_blob() == 1
    time.sleep(0.35)  # fresh for 0.3 s; still in Redis for the stale grace
    version["v"] = 2
    results = _concurrent(10, settings_blob)
    assert computations == [1, 2]
    # One recomputed, nine served stale: a reader that waited for the recomputation would
    # have read 2 (how long the ten took is not asserted: a loaded machine stretches it).
    assert sorted(results) == [1] * 9 + [2]
    cache_for(app).flush_stats()
    stats = cache_stats(runtime_of(app))["default"]
    assert stats["stale_served"] == 9


def test_stats_per_namespace(make_app: Any) -> None:
    cache = _cache(make_app)
    cache.set("user", "a", 1)
    for _ in range(3):
        cache.get("user", "a")
    cache.get("user", "missing")
    cache.get("analytics", "missing")
    cache.flush_stats()
    stats = cache_stats(cache.runtime)
    assert set(stats) == {"user", "analytics"}
    assert stats["user"]["hits"] == 3 and stats["user"]["misses"] == 1
    assert stats["user"]["hit_rate_pct"] == pytest.approx(75.0)
    # Milliseconds of a local Redis read: measured (above zero) and plausible; the bound is
    # loose, a loaded machine can take tens of milliseconds.
    assert 0 < stats["user"]["avg_latency_ms"] < 1000
    assert stats["analytics"]["misses"] == 1


def test_clear_tag_deletes_entries_with_progress(make_app: Any, redis_client: Any) -> None:
    cache = _cache(make_app)
    for i in range(1200):
        cache.set("user", f"u{i}", i, tags=["even" if i % 2 == 0 else "odd"])
    seen: list[tuple[int, int]] = []
    deleted = cache.clear_tag("even", batch=200, progress=lambda s, d: seen.append((s, d)))
    assert deleted == 600
    assert seen[-1] == (1200, 600) and len(seen) >= 6
    assert cache.get("user", "u1") == 1
    assert redis_client.exists(cache.keys.cache_value("user", "u0")) == 0


def _reader_process(start_at: float, results: Any) -> None:
    from taskyard import create_app
    from tests.servers import REDIS_URL

    app = create_app("cache-proc", redis_url=REDIS_URL)
    client = runtime_of(app).redis

    @cached(ttl=60, tags=["proc"], app=app)
    def expensive() -> str:
        client.incr("test:computations")
        time.sleep(0.5)
        return f"computed by {os.getpid()}"

    time.sleep(max(0.0, start_at - time.time()))
    results.put(expensive())


def test_stampede_across_processes(redis_client: Any) -> None:
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start_at = time.time() + 1.0
    procs = [ctx.Process(target=_reader_process, args=(start_at, results)) for _ in range(6)]
    for p in procs:
        p.start()
    values = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert int(redis_client.get("test:computations")) == 1
    assert len(set(values)) == 1  # every process got the one computed value


def test_unreachable_redis_computes_without_the_cache(make_app: Any) -> None:
    app = make_app("cache-down", redis_url="redis://127.0.0.1:1/0", broker_connect_timeout_s=0.2)
    calls: list[int] = []

    @cached(ttl=60, app=app)
    def value(x: int) -> int:
        calls.append(x)
        return x * 2

    assert value(2) == 4
    assert value(2) == 4
    assert calls == [2, 2]
