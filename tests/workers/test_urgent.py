"""Prefork workers start reserved tasks most urgent first (taskyard.workers.urgent)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from kombu.asynchronous.semaphore import LaxBoundedSemaphore

from taskyard.routing import LEVEL_NAMES
from taskyard.testing import celery_worker, run_python, wait_until
from taskyard.workers.urgent import UNRANKED, UrgentFirst, order_by_urgency, rank_of


def _request(name: str, queue: str | None) -> SimpleNamespace:
    return SimpleNamespace(name=name, delivery_info={"routing_key": queue})


def test_the_semaphore_line_starts_urgent_requests_first_and_levels_stay_fifo() -> None:
    # kombu's semaphore, as Celery's Pool step makes it: one free slot, then a line.
    semaphore = LaxBoundedSemaphore(1)
    assert order_by_urgency(semaphore)
    started: list[str] = []

    def process(request: SimpleNamespace) -> None:
        started.append(request.name)

    for name, queue in [
        ("running", "low"),
        ("low1", "low"),
        ("normal1", "normal"),
        ("low2", "low"),
        ("crit1", "critical"),
        ("normal2", "normal"),
        ("crit2", "critical"),
        ("other", "elsewhere"),
        ("high1", "high"),
    ]:
        semaphore.acquire(process, _request(name, queue))
    assert started == ["running"]
    for _ in range(8):
        semaphore.release()
    assert started == [
        "running",
        "crit1",
        "crit2",
        "high1",
        "normal1",
        "normal2",
        "low1",
        "low2",
        "other",
    ]
    semaphore.clear()  # Celery clears the line when the connection is lost
    assert not semaphore._waiting and isinstance(semaphore._waiting, UrgentFirst)


def test_ordering_keeps_waiters_already_in_line_and_ranks_unknowns_last() -> None:
    semaphore = LaxBoundedSemaphore(0)
    semaphore.acquire(print, _request("first", "low"))
    assert order_by_urgency(semaphore) and order_by_urgency(semaphore)
    assert [waiter[1][0].name for waiter in semaphore._waiting] == ["first"]
    assert rank_of((print, (_request("x", "critical"),), {})) == 0
    assert rank_of((print, (SimpleNamespace(delivery_info={}),), {})) == UNRANKED
    assert rank_of((print, (), {})) == UNRANKED
    assert rank_of((print, (object(),), {})) == UNRANKED
    assert not order_by_urgency(None)


@pytest.mark.slow
def test_a_worker_runs_a_critical_task_ahead_of_its_reserved_low_ones(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    # One process reserving three messages: one running (held by the gate), two low ones
    # waiting in the main process. A critical task sent then is fetched when the first
    # finishes and must run before the low one still waiting.
    env = {
        **redis_env,
        "TASKYARD_GUARD__ENABLED": "false",
        "TASKYARD_URGENT_PREFETCH_MULTIPLIER": "3",
    }

    def send(code: str) -> None:
        run_python(env, f"from tests.apps import broker\n{code}")

    redis_client.set("test:gate", 1)
    with celery_worker(
        "tests.apps.broker", ",".join(LEVEL_NAMES), env, tmp_path, concurrency=1, name="urgent"
    ) as worker:
        send(
            "broker.hold.delay('held')\n"
            "broker.WORK['low'].delay('low1', 0.3)\n"
            "broker.WORK['low'].delay('low2')\n"
        )
        wait_until(
            lambda: redis_client.llen("test:started") >= 1, 30, 0.05, "the held task to start"
        )
        time.sleep(0.5)  # the two low messages are reserved by now
        assert redis_client.llen("low") == 0
        send("broker.WORK['critical'].delay('crit')")
        redis_client.delete("test:gate")
        wait_until(lambda: redis_client.llen("test:started") >= 4, 30, 0.05, "every task to run")
        started = [
            entry.decode().split(":")[0] for entry in redis_client.lrange("test:started", 0, -1)
        ]
        log = worker.output()
    assert "prefetch 3 (x3 per process): reserved tasks start most urgent first" in log, log[-2000:]
    # The critical task went ahead of every reserved low task still waiting (low1 started when
    # the held task finished, before the critical one was fetched).
    assert started == ["held", "low1", "crit", "low2"], started
