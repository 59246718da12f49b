"""Dead-letter upkeep runs in the workers: no beat, no stats job (issue 18 item 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from taskyard.deadletters import DeadLetter, Query, RedisDeadLetterStore
from taskyard.deadletters.upkeep import upkeep
from taskyard.runtime import runtime_of
from taskyard.testing import celery_worker, wait_until
from tests.apps import dead as dead_app


def test_quarantine_and_retention_without_beat_or_the_stats_job(
    make_app: Any, redis_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    app = make_app("deadtest", include=["tests.apps.dead"], **dead_app.SETTINGS)
    store = RedisDeadLetterStore.for_runtime(runtime_of(app))
    store.record(DeadLetter(id="old", reason="failed"))
    assert store.get("old") is not None
    # Only a worker: no beat, so no stats collection ever runs. Its retention: 3 s.
    env = {
        **redis_env,
        "TASKYARD_DEAD_LETTERS__UPKEEP_INTERVAL_S": "0.5",
        "TASKYARD_DEAD_LETTERS__RETENTION_S": "3",
    }
    with celery_worker("tests.apps.dead", "normal", env, tmp_path, concurrency=1):
        redis_client.lpush("normal", b"not a kombu message")
        poisoned: list[DeadLetter] = []

        def dead_lettered() -> bool:
            poisoned[:] = store.search(Query(reason="poison"))
            return bool(poisoned)

        wait_until(dead_lettered, 60, 0.2, "the poison dead letter")
        # Read at once: the 3 s retention drops this entry too, later.
        assert [entry.body for entry in poisoned] == ["not a kombu message"]
        wait_until(lambda: store.get("old") is None, 60, 0.2, "retention to drop the old entry")
    assert redis_client.llen(runtime_of(app).keys.broker_quarantine()) == 0


def test_one_process_per_interval_does_the_work(make_app: Any, redis_client: redis.Redis) -> None:
    runtime = runtime_of(make_app("deadtest"))
    redis_client.lpush(runtime.keys.broker_quarantine(), b"x", b"y")
    first = upkeep(runtime, interval_s=60)
    assert first is not None and first["quarantined"] == 2
    redis_client.lpush(runtime.keys.broker_quarantine(), b"z")
    assert upkeep(runtime, interval_s=60) is None  # another process's turn was this interval
    assert redis_client.llen(runtime.keys.broker_quarantine()) == 1
