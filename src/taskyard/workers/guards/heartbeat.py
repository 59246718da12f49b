"""Worker heartbeat: readings, paused queues and deferral counts in Redis, with a TTL.

The record is what the stats API and the dashboard read (``keys.worker_heartbeat(hostname)``,
JSON) plus ``ZADD keys.workers() hostname -> at``. It expires after interval + slack, so a worker
that died disappears on its own. A thread publishes it (not the consumer's event loop), so a slow
or unreachable Redis never stalls task consumption.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger("taskyard.guards")


class Heartbeat:
    """Publishes ``record()`` every ``interval_s`` until stopped; removes it on a clean stop."""

    def __init__(
        self,
        redis_of: Callable[[], redis.Redis],
        key_of: Callable[[str], str],
        index_key: str,
        interval_s: float,
        slack_s: float,
        record: Callable[[], dict[str, Any]],
    ) -> None:
        self._redis_of = redis_of
        self._key_of = key_of
        self.index_key = index_key
        self.interval_s = interval_s
        self.ttl_s = max(1, math.ceil(interval_s + slack_s))
        self.record = record
        self.hostname: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._failing = False

    def start(self, hostname: str) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self.hostname = hostname
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taskyard-heartbeat", daemon=True)
        self._thread.start()

    def publish(self) -> dict[str, Any]:
        """Write one heartbeat now and return it."""
        assert self.hostname is not None
        data = self.record()
        client = self._redis_of()
        pipe = client.pipeline(transaction=False)
        pipe.set(self._key_of(self.hostname), json.dumps(data), ex=self.ttl_s)
        pipe.zadd(self.index_key, {self.hostname: data["at"]})
        pipe.execute()
        return data

    def _run(self) -> None:
        while True:
            try:
                self.publish()
                if self._failing:
                    log.info("heartbeat: Redis reachable again")
                self._failing = False
            except redis.RedisError as exc:
                if not self._failing:
                    log.warning(
                        "heartbeat: cannot publish (%s); retrying every %.1f s",
                        exc,
                        self.interval_s,
                    )
                self._failing = True
            except Exception:  # the heartbeat thread must outlive any one error
                log.exception("heartbeat: publishing failed")
            if self._stop.wait(self.interval_s):
                return

    def stop(self, remove: bool = True) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if remove and self.hostname is not None:
            try:
                client = self._redis_of()
                pipe = client.pipeline(transaction=False)
                pipe.delete(self._key_of(self.hostname))
                pipe.zrem(self.index_key, self.hostname)
                pipe.execute()
            except redis.RedisError as exc:
                log.warning("heartbeat: could not remove the record on shutdown (%s)", exc)


def base_record(hostname: str) -> dict[str, Any]:
    """The identity part of a heartbeat."""
    return {"hostname": hostname, "pid": os.getpid(), "at": time.time()}
