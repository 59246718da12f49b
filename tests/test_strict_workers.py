"""A taskyard app and a plain Celery app created after it, in one process: real worker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import redis

from taskyard.testing import ROOT, celery_worker, child_env, wait_until
from tests.apps.twoapps import RAN

pytestmark = pytest.mark.slow

PRODUCER = """
import threading
from tests.apps import twoapps as t

def produce(first):
    for i in range(first, first + 10):
        t.urgent.delay(i)
        t.report.delay(i)
        t.collect.delay({"i": i})
        t.legacy.delay(i)

produce(0)  # this thread's current Celery app is the plain one, created last
thread = threading.Thread(target=produce, args=(100,))  # no set_default() anywhere
thread.start()
thread.join()
"""


def test_every_task_reaches_its_queue_beside_a_plain_app(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    subprocess.run(
        [sys.executable, "-c", PRODUCER], env=child_env(redis_env), cwd=ROOT, check=True, timeout=60
    )
    # The plain app's own task went through the plain app, to its default queue.
    assert redis_client.llen("celery") == 20
    with celery_worker("tests.apps.twoapps", "high,low,batch", redis_env, tmp_path):
        wait_until(lambda: redis_client.llen(RAN) >= 60, 60, message="every taskyard task")
    ran = [json.loads(raw) for raw in redis_client.lrange(RAN, 0, -1)]
    expected = {"twoapps.urgent": "high", "twoapps.report": "low", "twoapps.batch": "batch"}
    assert Counter(r["task"] for r in ran) == {name: 20 for name in expected}
    for record in ran:
        assert record["queue"] == expected[record["task"]], record
    for name in expected:
        numbers = sorted(r["i"] for r in ran if r["task"] == name)
        assert numbers == [*range(10), *range(100, 110)], name
