"""Cache statistics: per-process counters per cache namespace, and reading them back.

Counters are buffered in the process and written to ``keys.cache_stats(namespace)`` by
:meth:`taskyard.cache.core.Cache.flush_stats` at most once a second, so a cache hit stays a
single round trip. :func:`cache_stats` is what the stats API reads.
"""

from __future__ import annotations

import os
import threading
import time
import weakref

from taskyard.runtime import Runtime
from taskyard.serialization import text


class Counters:
    """Per-process counters per cache namespace, taken by the flush."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, float]] = {}
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()
        _ALL_COUNTERS.add(self)

    def add(self, namespace: str, **counts: float) -> None:
        with self.lock:
            bucket = self.values.get(namespace)
            if bucket is None:
                bucket = self.values[namespace] = {}
            for name, amount in counts.items():
                bucket[name] = bucket.get(name, 0.0) + amount

    def hit(self, namespace: str, latency_us: float) -> None:
        """add(hits=1, reads=1, latency_us=...) without building keyword dicts: the hot path."""
        with self.lock:
            bucket = self.values.get(namespace)
            if bucket is None:
                bucket = self.values[namespace] = {}
            bucket["hits"] = bucket.get("hits", 0.0) + 1
            bucket["reads"] = bucket.get("reads", 0.0) + 1
            bucket["latency_us"] = bucket.get("latency_us", 0.0) + latency_us

    def take(self) -> dict[str, dict[str, float]]:
        with self.lock:
            taken, self.values = self.values, {}
            self.last_flush = time.monotonic()
            return taken

    def forget(self) -> None:
        # A forked child inherits the parent's unflushed counts; they are not its own.
        self.values = {}
        self.lock = threading.Lock()


_ALL_COUNTERS: weakref.WeakSet[Counters] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for counters in list(_ALL_COUNTERS):
        counters.forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


def cache_stats(runtime: Runtime) -> dict[str, dict[str, float]]:
    """Hit, miss and latency figures per cache namespace, as plain dicts (for the stats API)."""
    client = runtime.redis
    members = client.smembers(runtime.keys.cache_namespaces())
    namespaces = sorted(text(n) for n in members)
    pipe = client.pipeline(transaction=False)
    for namespace in namespaces:
        pipe.hgetall(runtime.keys.cache_stats(namespace))
    result: dict[str, dict[str, float]] = {}
    for namespace, raw in zip(namespaces, pipe.execute(), strict=True):
        counts = {text(k): float(v) for k, v in raw.items()}
        hits, misses = counts.get("hits", 0.0), counts.get("misses", 0.0)
        reads = counts.get("reads", 0.0)
        result[namespace] = {
            "hits": hits,
            "misses": misses,
            "stale_served": counts.get("stale", 0.0),
            "waited": counts.get("waited", 0.0),
            "sets": counts.get("sets", 0.0),
            "errors": counts.get("errors", 0.0),
            "hit_rate_pct": 100.0 * hits / (hits + misses) if hits + misses else 0.0,
            "avg_latency_ms": counts.get("latency_us", 0.0) / reads / 1000 if reads else 0.0,
            "compute_s_total": counts.get("compute_s", 0.0),
        }
    return result
