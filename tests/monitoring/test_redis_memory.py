"""Evictions and memory of the broker's and buffers' Redis in /metrics and the alerts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from taskyard.monitoring.alerts import evaluate
from taskyard.monitoring.collect import _redis_memory
from taskyard.monitoring.redis_memory import RedisMemoryCollector, RedisReader
from taskyard.runtime import runtime_of
from tests import servers
from tests.servers import RedisServer


def test_evictions_reach_metrics_and_the_built_in_alert(
    make_app: Any, redis_server: Callable[..., RedisServer]
) -> None:
    options = ("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru")
    with redis_server(*options) as server:
        # Broker on the private (evicting) Redis, buffers on the suite's: two rows.
        app = make_app("mem", broker_url=server.url, redis_url=servers.REDIS_URL)
        runtime = runtime_of(app)
        for i in range(100):
            server.client.set(f"cache:{i}", b"x" * 100_000)
        assert int(server.client.info("stats")["evicted_keys"]) > 0

        registry = CollectorRegistry(auto_describe=False)
        registry.register(RedisMemoryCollector(RedisReader(runtime.settings)))
        text = generate_latest(registry).decode()
        assert 'taskyard_redis_evicting_policy{policy="allkeys-lru",redis="broker"} 1.0' in text
        assert 'taskyard_redis_evicting_policy{policy="noeviction",redis="buffers"} 0.0' in text
        assert 'taskyard_redis_maxmemory_bytes{redis="broker"} 3.145728e+06' in text
        evicted = [
            x for x in text.splitlines() if x.startswith("taskyard_redis_evicted_keys_total")
        ]
        assert any('redis="broker"' in x and float(x.split()[-1]) > 0 for x in evicted), evicted

        rows = _redis_memory(runtime, {"redis_evicted": {"broker": 0, "buffers": 0}})
        names = {b.alertname for b in evaluate({"redis": rows}, runtime.settings)}
        assert "RedisEvicting" in names
        # The next collection, with nothing evicted since: no longer evicting.
        again = _redis_memory(
            runtime, {"redis_evicted": {r["redis"]: r["evicted_keys"] for r in rows}}
        )
        assert all(r["evicted_recently"] == 0 for r in again)
