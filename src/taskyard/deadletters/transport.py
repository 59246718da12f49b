"""Queue items taskyard's Redis transport set aside, moved into the one dead-letter store.

The transport's fetch script (``broker/fetch.lua``) moves a queue item that is not a kombu message
at all (not JSON, no delivery tag) to ``Keys.broker_quarantine`` in the broker's Redis before any
consumer sees it (and the restore sweep a record it cannot read). The workers' dead-letter
upkeep (:mod:`taskyard.deadletters.upkeep`) calls :func:`ingest` to turn those items into poison
entries, so every message that could not run is found in one place.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import redis

from taskyard.deadletters.entry import DeadLetter, cap
from taskyard.deadletters.recorder import Recorder, _poison_id
from taskyard.runtime import redis_client

log = logging.getLogger(__name__)

DETAIL = "not a kombu message: set aside by taskyard's Redis transport before delivery"
_clients: dict[str, redis.Redis] = {}


def _broker_client(runtime: Any) -> redis.Redis | None:
    url = runtime.settings.effective_broker_url
    if url.split("://", 1)[0] not in {"redis", "rediss"}:
        return None  # RabbitMQ: nothing is set aside (Celery's consumer sees every message)
    if url == runtime.settings.effective_redis_url:
        return runtime.redis  # type: ignore[no-any-return]
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = redis_client(url)
    return client


def ingest(runtime: Any, *, keyprefix: str = "", limit: int = 1000) -> int:
    """Record up to ``limit`` set-aside items as poison entries, oldest first; returns how many.

    Items are read from the list's tail and trimmed only after they were recorded, so a failed
    record leaves them for the next run (a concurrent push at the head is untouched).
    """
    client = _broker_client(runtime)
    if client is None:
        return 0
    key = keyprefix + runtime.keys.broker_quarantine()
    items = client.lrange(key, -limit, -1)
    if not items:
        return 0
    recorder = Recorder(runtime)
    recorded = 0
    # LPUSHed: the tail is the oldest; record oldest first, trim exactly what was recorded.
    for raw in reversed(items):
        data = raw if isinstance(raw, bytes) else str(raw).encode()
        if not recorder.record(_entry(recorder, data)):
            break
        recorded += 1
    if recorded:
        client.ltrim(key, 0, -(recorded + 1))
    return recorded


def _entry(recorder: Recorder, raw: bytes) -> DeadLetter:
    head = raw[: recorder.payload_limit]
    try:
        body, encoding = head.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(head).decode(), "base64"
    if encoding == "utf-8":
        body, _ = cap(body, recorder.payload_limit)
    return DeadLetter(
        id=_poison_id(),
        reason="poison",
        detail=DETAIL,
        body=body,
        body_encoding=encoding,
        replayable=False,
        worker="broker",
    )
