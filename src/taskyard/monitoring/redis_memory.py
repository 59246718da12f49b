"""Memory and evictions of the broker's and the buffers' Redis: ``/metrics`` and the alerts.

Workers refuse to start on a Redis that evicts (:mod:`taskyard.broker.memory`), but a policy
can change under a running stack (CONFIG SET), and a ``noeviction`` Redis that fills refuses
every write. So each scrape reads ``INFO memory`` and ``INFO stats`` of each Redis (once when
broker and buffers share one) and exports used memory, the ``maxmemory`` limit, evicted keys and
whether the policy may evict taskyard's keys; each stats collection puts the same readings in
its snapshot for the built-in alerts (RedisEvicting, RedisMemoryHigh).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from taskyard.broker.memory import evicts
from taskyard.config import Settings, is_redis_url, redis_client_url, url_scheme

log = logging.getLogger(__name__)


def targets(settings: Settings) -> list[tuple[str, str, bool]]:
    """(role, redis-py URL, whether keys with a TTL matter) of each Redis to read, once each."""
    out: list[tuple[str, str, bool]] = []
    broker = settings.effective_broker_url
    if is_redis_url(broker) and url_scheme(broker) != "sentinel":
        out.append(("broker", redis_client_url(broker), True))
    buffers = redis_client_url(settings.effective_redis_url)
    if not out or _server(buffers) != _server(out[0][1]):
        out.append(("buffers", buffers, False))
    return out


def _server(url: str) -> str:
    # The server part of a URL (scheme, host, port): databases of one server share its memory.
    return url.split("://", 1)[-1].rsplit("/", 1)[0].rpartition("@")[2]


class RedisReader:
    """Reads each Redis of ``settings``, keeping one small client per server."""

    def __init__(self, settings: Settings) -> None:
        self.targets = targets(settings)
        timeout = settings.broker_connect_timeout_s
        self.clients = {
            role: redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
            for role, url, _ in self.targets
        }

    def readings(self) -> list[dict[str, Any]]:
        """One row per Redis; a Redis that does not answer is left out (and logged)."""
        rows = []
        for role, _, ttls_matter in self.targets:
            try:
                memory = self.clients[role].info("memory")
                stats = self.clients[role].info("stats")
            except redis.RedisError as exc:
                log.warning("redis memory: the %s Redis did not answer: %s", role, exc)
                continue
            policy = str(memory.get("maxmemory_policy", "noeviction"))
            rows.append(
                {
                    "redis": role,
                    "used_memory": int(memory.get("used_memory", 0)),
                    "maxmemory": int(memory.get("maxmemory", 0) or 0),
                    "policy": policy,
                    "evicting": evicts(policy, ttls_matter=ttls_matter),
                    "evicted_keys": int(stats.get("evicted_keys", 0)),
                }
            )
        return rows

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


class RedisMemoryCollector(Collector):
    """The readings of :class:`RedisReader` as Prometheus families, read at scrape time."""

    def __init__(self, reader: RedisReader) -> None:
        self.reader = reader

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        used = GaugeMetricFamily(
            "taskyard_redis_used_memory_bytes", "Memory a Redis uses.", labels=["redis"]
        )
        limit = GaugeMetricFamily(
            "taskyard_redis_maxmemory_bytes",
            "A Redis' maxmemory (0: no limit). Under noeviction it refuses writes past it.",
            labels=["redis"],
        )
        evicted = CounterMetricFamily(
            "taskyard_redis_evicted_keys",
            "Keys a Redis evicted since it started: queued work may have been lost.",
            labels=["redis"],
        )
        policy = GaugeMetricFamily(
            "taskyard_redis_evicting_policy",
            "1 when a Redis' maxmemory-policy may evict taskyard's keys.",
            labels=["redis", "policy"],
        )
        for row in self.reader.readings():
            role = [row["redis"]]
            used.add_metric(role, float(row["used_memory"]))
            limit.add_metric(role, float(row["maxmemory"]))
            evicted.add_metric(role, float(row["evicted_keys"]))
            policy.add_metric([row["redis"], row["policy"]], 1.0 if row["evicting"] else 0.0)
        yield from (used, limit, evicted, policy)
