"""Cache: hit latency against a bare Redis GET, and the hit rate of the example workload.

Celery has no cache; the plain baseline of the latency figure is what a hand-written cache read
costs at least: one ``GET`` with redis-py on the same server. The hit rate is measured on the
example service (SQLite, seeded) after its warmers ran; the cold-cache rate of the same workload
is given in the notes.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from typing import Any

import redis

from benchmarks.common import BENCH_REDIS_URL, Result, percentile

_PROFILE = {
    "id": 42,
    "email": "user42@bdc.example",
    "username": "user42",
    "role": "beneficiary",
    "is_active": True,
}


def _per_call_us(fn: Any, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return samples


def hit_latency(n: int) -> tuple[list[float], list[float]]:
    """Per-call microseconds: a ``@cached`` hit, and a bare GET of the same payload."""
    from taskyard import create_app
    from taskyard.cache.core import cached

    app = create_app("bench-cache", redis_url=BENCH_REDIS_URL)

    @cached(resource="user", tags=["users", "user:{user_id}"], app=app)
    def profile(user_id: int) -> dict[str, Any]:
        return dict(_PROFILE, id=user_id)

    client = redis.Redis.from_url(BENCH_REDIS_URL)
    client.set("bench:bare", json.dumps(_PROFILE))
    profile(42)  # fill
    for _ in range(500):  # warm both connections and code paths
        profile(42)
        client.get("bench:bare")
    ours: list[float] = []
    bare: list[float] = []
    # Interleaved blocks so both sides see the same machine load.
    for _ in range(10):
        ours.extend(_per_call_us(lambda: profile(42), n // 10))
        bare.extend(_per_call_us(lambda: client.get("bench:bare"), n // 10))
    client.close()
    return ours, bare


def hit_rate(reads: int) -> tuple[float, float, dict[str, Any]]:
    """(hit rate % after warming, cold hit rate %, warm report) on the example workload."""
    workdir = tempfile.mkdtemp(prefix="bench-cache-")
    # The example app reads its settings when imported: point it at the benchmark's servers.
    os.environ["TASKYARD_REDIS_URL"] = BENCH_REDIS_URL
    os.environ["TASKYARD_DATABASE_URL"] = f"sqlite:///{workdir}/bdc.db"
    from examples.bdc import warmers
    from examples.bdc.app import app
    from examples.bdc.db import seed

    from taskyard.cache.core import cache_for, cache_stats
    from taskyard.cache.warming import run_warmers
    from taskyard.runtime import runtime_of

    runtime = runtime_of(app)
    seed()

    def workload(seed_value: int) -> float:
        rng = random.Random(seed_value)
        before = _totals(cache_stats(runtime))
        for _ in range(reads):
            roll = rng.random()
            if roll < 0.6:
                warmers.user_profile(rng.randint(1, 210))
            elif roll < 0.9:
                warmers.upcoming_appointments(rng.randint(1, 200))
            else:
                warmers.system_settings()
        cache_for(runtime).flush_stats()
        hits, misses = (a - b for a, b in zip(_totals(cache_stats(runtime)), before, strict=True))
        return 100.0 * hits / (hits + misses)

    runtime.redis.flushdb()
    cold = workload(1)
    runtime.redis.flushdb()
    report = run_warmers(runtime)
    warm = workload(2)
    return warm, cold, report


def _totals(stats: dict[str, dict[str, float]]) -> tuple[float, float]:
    return (sum(s["hits"] for s in stats.values()), sum(s["misses"] for s in stats.values()))


def run(quick: bool) -> list[Result]:
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    client.flushdb()
    n = 4_000 if quick else 40_000
    ours, bare = hit_latency(n)
    mean_ours, mean_bare = sum(ours) / len(ours), sum(bare) / len(bare)
    p50_ours, p50_bare = percentile(ours, 50), percentile(bare, 50)
    warm, cold, report = hit_rate(1_000 if quick else 5_000)
    client.flushdb()
    client.close()
    return [
        Result(
            "cache.hit_latency",
            "@cached hit, mean",
            "us",
            mean_ours,
            mean_bare,
            goal="<= 1.5x bare GET",
            higher_is_better=False,
            notes=f"celery column: bare redis-py GET of the same payload; "
            f"{mean_ours / mean_bare:.2f}x; n={n}",
        ),
        Result(
            "cache.hit_latency",
            "@cached hit, p50",
            "us",
            p50_ours,
            p50_bare,
            goal="<= 1.5x bare GET",
            higher_is_better=False,
            notes=f"{p50_ours / p50_bare:.2f}x the bare GET",
        ),
        Result(
            "cache.hit_rate",
            "example workload after warming",
            "%",
            warm,
            None,
            goal=">= 80 %",
            notes=f"same workload on a cold cache: {cold:.1f} %; warmers stored "
            f"{report['keys']} keys in {report['duration_s']:.3f} s",
        ),
    ]
