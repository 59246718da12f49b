"""A message nested past the limit, sent around `.delay()`, never wedges a worker: it is
dead-lettered and acknowledged before the pool sees it (issue 18 item 1)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from taskyard.deadletters import Query, RedisDeadLetterStore
from taskyard.runtime import runtime_of
from taskyard.testing import celery_worker, wait_until
from tests.apps import dead as dead_app
from tests.deadletters.test_workers import publish_raw


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_a_deep_message_is_dead_lettered_and_the_worker_keeps_serving(
    make_app: Any, redis_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, pool: str
) -> None:
    app = make_app("deadtest", include=["tests.apps.dead"], **dead_app.SETTINGS)
    store = RedisDeadLetterStore.for_runtime(runtime_of(app))
    ids = {depth: str(uuid.uuid4()) for depth in (500, 900, 985)}
    with celery_worker(
        "tests.apps.dead", "normal", redis_env, tmp_path, concurrency=1, pool=pool
    ) as worker:
        for depth, task_id in ids.items():
            body = json.dumps([["[" * depth + "]" * depth], {}, {}])
            body = body.replace('"', "")  # the argument itself nested, not a string
            publish_raw(
                app,
                body,
                content_type="application/json",
                headers={"task": dead_app.ok.name, "id": task_id, "lang": "py"},
            )
        dead_app.ok.delay("after")
        wait_until(
            lambda: b"ok-after" in redis_client.lrange(dead_app.RAN, 0, -1),
            60,
            0.2,
            "a task after them (the worker still serves)",
        )
        wait_until(
            lambda: store.count(Query(reason="poison")) == len(ids), 30, 0.2, "the dead letters"
        )
        assert worker.process.poll() is None
    for task_id in ids.values():
        entry = store.get(task_id)
        assert entry is not None and "nested" in entry.detail, entry
    assert redis_client.hlen("unacked") == 0  # acknowledged: nothing comes back
