"""Test app for the periodic jobs: a warmer that records every run it makes."""

from __future__ import annotations

import time

from taskyard import create_app
from taskyard.cache.core import Cache
from taskyard.cache.warming import cache_warmer
from taskyard.runtime import runtime_of

app = create_app("periodic")

RUNS_KEY = "test:warm-runs"


@cache_warmer("periodic_test", description="records its runs")
def warm_test_entries(cache: Cache) -> int:
    runtime_of(app).redis.rpush(RUNS_KEY, f"{time.time():.6f}")
    for i in range(5):
        cache.set("test", f"k{i}", {"i": i}, ttl=60)
    return 5
