"""The no-op task on Dramatiq (Redis broker, default middleware): the peer of the fast profile.

Imported only inside the peers' venv that ``scripts/ensure-bench-peers.sh`` makes; Dramatiq is
never a dependency of taskyard.
"""

from __future__ import annotations

import os
import sys
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

REDIS_URL = os.environ.get("BENCH_CORE_REDIS_URL", "redis://127.0.0.1:6379/12")
dramatiq.set_broker(RedisBroker(url=REDIS_URL))
_redis = redis.Redis.from_url(REDIS_URL)


@dramatiq.actor(queue_name="bench")
def noop() -> None:
    if _redis.incr("bench:done") == 1:
        _redis.set("bench:first", time.time())


if __name__ == "__main__":  # enqueue N messages: python -m benchmarks.apps.core_dramatiq N
    for _ in range(int(sys.argv[1])):
        noop.send()
