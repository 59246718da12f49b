"""Batches through real `celery worker` processes: size and age flushes, a producer that exits,
a worker SIGKILLed mid-batch, retries, partial failures, dead letters and requeue; on Redis and on
RabbitMQ as the broker (buffers always in Redis)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from taskyard.batching import inspect_batches, list_dead, requeue_dead
from taskyard.testing import celery_worker, run_python, wait_until
from tests.apps import batch as batch_app

pytestmark = pytest.mark.slow

APP = "tests.apps.batch"


@pytest.fixture
def producer(make_app: Any, broker_env: dict[str, str]) -> Any:
    """The test app's configuration in this process, on the same Redis and broker as the
    worker; batch tasks' .delay/.add_many use it (it is the current app)."""
    overrides: dict[str, Any] = dict(batch_app.SETTINGS)
    if "TASKYARD_BROKER_URL" in broker_env:
        overrides["broker_url"] = broker_env["TASKYARD_BROKER_URL"]
    return make_app("batchtest", **overrides)


def processed(client: redis.Redis) -> Counter[Any]:
    """How many times each item (by its "i") was processed."""
    return Counter(json.loads(x)["i"] for x in client.lrange(batch_app.PROCESSED, 0, -1))


def state_of(app: Any, name: str) -> dict[str, Any]:
    return next(s for s in inspect_batches(app) if s["batch_name"] == name)


def test_size_and_age_flushes_deliver_every_item(
    producer: Any, broker_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    with celery_worker(APP, "batch", broker_env, tmp_path, concurrency=2):
        batch_app.collect.add_many({"i": i} for i in range(95))
        for i in range(95, 103):
            batch_app.collect.delay({"i": i})
        # 10 size flushes, then the last 3 items wait for the age flush (max_wait 0.5 s).
        wait_until(lambda: len(processed(redis_client)) == 103, 20, message="all 103 items")
        batch_app.by_tenant.add_many({"tenant": f"t{i % 3}", "i": i} for i in range(200, 230))
        wait_until(lambda: len(processed(redis_client)) == 133, 20, message="tenant items")
    counts = processed(redis_client)
    assert set(counts) == set(range(103)) | set(range(200, 230))
    assert max(counts.values()) == 1  # no crash, no duplicate
    sizes = [json.loads(x)["size"] for x in redis_client.lrange(batch_app.BATCHES, 0, -1)]
    assert max(sizes) <= 10
    state = state_of(producer, "collect")
    assert state["processed"] == 103 and state["pending"] == 0
    assert state["flush_reasons"]["size"] == 10 and state["flush_reasons"]["age"] >= 1
    tenants = state_of(producer, "by_tenant")
    assert {g["group"] for g in tenants["groups"]} == {"t0", "t1", "t2"}
    assert tenants["processed"] == 30


def test_age_flush_after_the_producer_exited(
    redis_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    with celery_worker(APP, "batch", redis_env, tmp_path, concurrency=1):
        code = (
            "from tests.apps import batch\nbatch.collect.add_many([{'i': i} for i in range(7)])\n"
        )
        run_python(redis_env, code, timeout_s=60)
        # Nobody flushes after the producer exits but the worker's reaper (max_wait 0.5 s, run
        # every 0.2 s): the items arriving at all is the outcome; the wait is generous for a
        # loaded machine and how long it took is not asserted.
        wait_until(
            lambda: len(processed(redis_client)) == 7, 30, 0.02, message="the 7 buffered items"
        )
    assert processed(redis_client) == Counter(range(7))


def test_worker_killed_mid_batch_loses_nothing(
    producer: Any, broker_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    n = 200
    with celery_worker(APP, "batch", broker_env, tmp_path, concurrency=2, name="doomed") as doomed:
        batch_app.slow.add_many({"i": i} for i in range(n))  # 10 batches of 20, 1.5 s each
        wait_until(
            lambda: redis_client.llen(batch_app.STARTED) >= 2, 20, message="two batches to start"
        )
        doomed.kill()  # SIGKILL to the whole worker: main process and pool children
    killed_mid_batch = redis_client.llen(batch_app.STARTED) - len(
        [1 for x in redis_client.lrange(batch_app.BATCHES, 0, -1)]
    )
    assert killed_mid_batch >= 1
    with celery_worker(APP, "batch", broker_env, tmp_path, concurrency=2, name="rescuer"):
        wait_until(
            lambda: len(processed(redis_client)) == n, 60, message=f"all {n} items after the kill"
        )
        wait_until(
            lambda: state_of(producer, "slow")["pending"] == 0, 20, message="nothing pending"
        )
    counts = processed(redis_client)
    assert set(counts) == set(range(n))
    state = state_of(producer, "slow")
    # The batches that were running when the worker died ran again, counted as duplicates.
    assert state["processed"] == n
    assert state["duplicates"] >= killed_mid_batch
    assert state["in_flight"] == 0 and state["dead"] == 0


def test_retries_partial_failures_dead_letters_and_requeue(
    producer: Any, broker_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    items = [{"i": i, "fail": 1 if i % 3 == 0 else 0} for i in range(8)]
    items += [{"i": 8, "fail": 1, "whole": True}, {"i": 9}, {"i": 10}, {"i": 11}]
    items += [{"i": 12, "fail": 3}]  # fails all 3 attempts (max_retries 2): dead
    with celery_worker(APP, "batch", broker_env, tmp_path, concurrency=2):
        batch_app.flaky.add_many(items)
        wait_until(lambda: len(processed(redis_client)) == 12, 30, message="12 good items")
        wait_until(lambda: state_of(producer, "flaky")["dead"] == 1, 30, message="a dead batch")
        # Partial failures retried only the failed items: every item ran exactly once.
        assert processed(redis_client) == Counter(range(12))
        [dead] = list_dead(producer, "flaky")
        assert dead["size"] == 1 and dead["attempts"] == 3
        assert json.loads(dead["items"][0])["i"] == 12
        assert "PartialFailure" in dead["error"]
        state = state_of(producer, "flaky")
        assert state["retries"] >= 3 and state["dead_items"] == 1 and state["pending"] == 0
        assert requeue_dead(producer, "flaky") == [dead["batch_id"]]
        wait_until(lambda: 12 in processed(redis_client), 20, message="the requeued item")
    state = state_of(producer, "flaky")
    assert state["dead"] == 0 and state["processed"] == 13 and state["requeued"] == 1
    attempts = {int(k): int(v) for k, v in redis_client.hgetall("test:batch:attempts").items()}
    assert attempts[12] == 4 and attempts[8] == 2 and attempts[0] == 2 and attempts[1] == 1


def test_a_batch_longer_than_its_lease_keeps_it(
    producer: Any, broker_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    with celery_worker(APP, "batch", broker_env, tmp_path, concurrency=2):
        batch_app.long_running.add_many([{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}])
        wait_until(lambda: len(processed(redis_client)) == 4, 20, message="the long batches")
        time.sleep(0.5)  # a duplicate would have been republished by now
    state = state_of(producer, "long")
    assert processed(redis_client) == Counter(range(4))
    assert state["duplicates"] == 0 and state["lease_expired"] == 0
    assert state["busy_deliveries"] == 0 and state["processed"] == 4
