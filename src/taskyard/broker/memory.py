"""Refuse a Redis that evicts: the broker's and the buffers' memory policy, checked at start.

Under ``maxmemory`` with an ``allkeys-*`` policy (a common cache setting) Redis silently drops
whatever key it picks when memory fills: queued messages, delayed sets, unacked records, batch
buffers, dead letters. Nothing raises, nothing is logged. So a worker (a bootstep built before
anything is consumed) and ``taskyard up`` read each Redis' policy (``INFO memory``, which
managed services that rename ``CONFIG`` still answer) and refuse to start on one that evicts,
naming the setting and the fix. ``volatile-*`` policies evict only keys with a TTL: on the
broker's Redis those are delivery counts (they bound poison redelivery) and kombu's restore
mutex, so it is refused there; on a Redis holding only buffers, cache and stats, keys with a
TTL are cache entries, heartbeats and locks that may go early, so it is accepted.
``TASKYARD_ALLOW_EVICTING_REDIS=true`` starts anyway, with the same text as a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import bootsteps

from taskyard.config import Settings, is_redis_url, redis_client_url, url_scheme
from taskyard.errors import ConfigurationError
from taskyard.runtime import find_runtime

log = logging.getLogger(__name__)

#: The setting that starts a worker or a stack on an evicting Redis anyway.
OVERRIDE = "TASKYARD_ALLOW_EVICTING_REDIS"


def evicts(policy: str, *, ttls_matter: bool) -> bool:
    """Whether a Redis with ``maxmemory-policy`` ``policy`` may drop taskyard's keys."""
    return policy.startswith("allkeys-") or (ttls_matter and policy.startswith("volatile-"))


def problem(client: redis.Redis, role: str, *, ttls_matter: bool) -> str | None:
    """What is wrong with the memory policy of ``client``'s Redis (None: nothing)."""
    info = client.info("memory")
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if not evicts(policy, ttls_matter=ttls_matter):
        return None
    limit = int(info.get("maxmemory", 0) or 0)
    where = f"maxmemory {limit} bytes" if limit else "no maxmemory yet"
    return (
        f"the {role} Redis has maxmemory-policy {policy} ({where}): when memory fills it "
        "silently evicts queued tasks, delayed tasks, batch buffers and dead letters. Set "
        "maxmemory-policy noeviction on it (CONFIG SET maxmemory-policy noeviction, and in "
        "redis.conf), or give the cache a Redis of its own; to start anyway, set "
        f"{OVERRIDE}=true"
    )


def _address(client: redis.Redis) -> tuple[Any, ...]:
    kwargs = client.connection_pool.connection_kwargs
    return (kwargs.get("host"), kwargs.get("port"), kwargs.get("path"))


def check_eviction(settings: Settings) -> list[str]:
    """Check the broker's and the buffers' Redis; the problems found (warnings when allowed).

    Raises:
        ConfigurationError: a Redis evicts and :data:`OVERRIDE` is not set.
    """
    timeout = settings.broker_connect_timeout_s
    clients: list[tuple[redis.Redis, str, bool]] = []
    broker = settings.effective_broker_url
    if is_redis_url(broker) and url_scheme(broker) != "sentinel":
        clients.append((_client(redis_client_url(broker), timeout), "broker's", True))
    buffers = _client(redis_client_url(settings.effective_redis_url), timeout)
    if not clients or _address(buffers) != _address(clients[0][0]):
        clients.append((buffers, "buffers' (TASKYARD_REDIS_URL)", False))
    found: list[str] = []
    try:
        for client, role, ttls_matter in clients:
            try:
                text = problem(client, role, ttls_matter=ttls_matter)
            except redis.RedisError as exc:
                # Unreachable now: the worker's own connection retries say so; not a policy.
                log.warning("cannot read the memory policy of the %s Redis: %s", role, exc)
                continue
            if text is not None:
                found.append(text)
    finally:
        for client, _, _ in clients:
            client.close()
    if found and not settings.allow_evicting_redis:
        raise ConfigurationError("; ".join(found), setting=OVERRIDE, value=False)
    for text in found:
        log.warning("%s (%s=true: starting anyway)", text, OVERRIDE)
    return found


def _client(url: str, timeout: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)


class EvictionCheck(bootsteps.Step):  # type: ignore[misc]
    """Worker bootstep: refuse to build the worker on a Redis that evicts (before it consumes)."""

    name = "taskyard.eviction_check"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        runtime = find_runtime(worker.app)
        if runtime is not None:
            check_eviction(runtime.settings)
        super().__init__(worker, **kwargs)


def install(app: Any) -> None:
    """Add :class:`EvictionCheck` to ``app``'s worker (no I/O here)."""
    app.steps["worker"].add(EvictionCheck)
