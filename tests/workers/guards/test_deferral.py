"""Resource guards: deferral through a real Redis broker (same id, arguments and level;
overdue tasks run; requires_memory; the visibility timeout bound; guards off)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis
from celery.exceptions import Ignore

from taskyard.errors import ConfigurationError
from taskyard.workers.guards import (
    HEADER_DEFERRALS,
    HEADER_SINCE,
    MemoryReadings,
    guard_of,
)
from taskyard.workers.guards.defer import DEFERRED, OVERDUE
from tests.workers.guards.fakes import queued, reading


def test_deferral_republishes_same_id_args_level_and_counts(
    guarded: Any, redis_client: redis.Redis
) -> None:
    from taskyard.signals import task_deferred

    _, task, guard = guarded
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any = None, **kwargs: Any) -> None:
        seen.append({"sender": sender, **kwargs})

    task_deferred.connect(receiver, weak=False)
    try:
        task.push_request(
            id="abc-1",
            args=[1],
            kwargs={"y": 2},
            delivery_info={"routing_key": "low", "exchange": "taskyard"},
        )
        try:
            with pytest.raises(Ignore):
                task.before_start("abc-1", [1], {"y": 2})
        finally:
            task.pop_request()
    finally:
        task_deferred.disconnect(receiver)
    [message] = queued(redis_client, "low")
    headers = message["headers"]
    assert headers["id"] == "abc-1" and headers["task"] == "unit.low"
    assert headers[HEADER_DEFERRALS] == 1 and headers[HEADER_SINCE] > time.time() - 10
    # Re-published with a countdown, not spinning hot (the delayed set keeps it as taskyard_eta).
    assert (headers.get("eta") or headers.get("taskyard_eta")) is not None
    body = json.loads(__import__("base64").b64decode(message["body"]))
    assert body[0] == [1] and body[1] == {"y": 2}
    assert guard.counters.get(DEFERRED) == 1
    assert seen == [
        {
            "sender": "unit.low",
            "task_id": "abc-1",
            "level": "low",
            "reason": "memory 95.0% above 80%",
            "deferrals": 1,
            "kind": "memory",
            "signal": task_deferred,
        }
    ]
    assert guard.counters.by_reason() == {"memory": 1, "requires_memory": 0}


def test_per_call_level_is_kept_on_deferral(guarded: Any, redis_client: redis.Redis) -> None:
    _, task, _ = guarded
    task.push_request(
        id="abc-2",
        args=[1],
        kwargs={},
        delivery_info={"routing_key": "batch"},
        **{HEADER_DEFERRALS: 3, HEADER_SINCE: time.time() - 5},
    )
    try:
        with pytest.raises(Ignore):
            task.before_start("abc-2", [1], {})
    finally:
        task.pop_request()
    [message] = queued(redis_client, "batch")
    assert message["headers"][HEADER_DEFERRALS] == 4
    assert redis_client.llen("low") == 0


def test_overdue_task_runs_and_is_counted(
    guarded: Any, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    _, task, guard = guarded
    task.push_request(
        id="abc-3",
        args=[1],
        kwargs={},
        delivery_info={"routing_key": "low"},
        **{HEADER_DEFERRALS: 7, HEADER_SINCE: time.time() - 120},
    )
    try:
        with caplog.at_level("WARNING", logger="taskyard.guards"):
            task.before_start("abc-3", [1], {})  # no Ignore: it runs
    finally:
        task.pop_request()
    assert redis_client.llen("low") == 0
    assert guard.counters.get(OVERDUE) == 1
    assert any("overdue: deferred 7 times" in r.getMessage() for r in caplog.records)


def test_admitted_and_critical_tasks_are_not_deferred(
    guarded: Any, redis_client: redis.Redis
) -> None:
    _, task, guard = guarded
    task.push_request(id="abc-4", args=[1], kwargs={}, delivery_info={"routing_key": "critical"})
    try:
        task.before_start("abc-4", [1], {})
    finally:
        task.pop_request()
    guard.source.set(memory_pct=10.0)
    task.push_request(id="abc-5", args=[1], kwargs={}, delivery_info={"routing_key": "low"})
    try:
        task.before_start("abc-5", [1], {})
    finally:
        task.pop_request()
    assert not queued(redis_client, "low") and guard.counters.get(DEFERRED) == 0


def test_requires_memory_defers_until_available(make_app: Any, redis_client: redis.Redis) -> None:
    from taskyard import priority_task

    app = make_app("guardneeds")

    @priority_task(priority="normal", requires_memory_mb=512)
    def needy() -> None:
        pass

    task = app.tasks[needy.name]
    guard = guard_of(app)
    assert guard is not None
    guard.source = MemoryReadings(reading(memory=10.0, available_mb=300.0))
    task.push_request(id="n-1", args=[], kwargs={}, delivery_info={"routing_key": "normal"})
    try:
        with pytest.raises(Ignore):
            task.before_start("n-1", [], {})
        guard.source.set(memory_available_mb=2048.0)
        task.before_start("n-1", [], {})
    finally:
        task.pop_request()
    assert len(queued(redis_client, "normal")) == 1


def test_countdown_must_stay_below_the_visibility_timeout(make_app: Any) -> None:
    with pytest.raises(ConfigurationError, match="visibility timeout"):
        make_app(
            "guardbad",
            visibility_timeout_s=100.0,
            reservation_lease_s=0,
            guard={"defer_countdown_s": 60.0, "defer_jitter_s": 1.0},
        )
    # Leased reservations (the default) renew held countdown messages: no bound applies.
    make_app(
        "guardlease",
        visibility_timeout_s=100.0,
        guard={"defer_countdown_s": 60.0, "defer_jitter_s": 1.0},
    )


def test_guards_disabled_admit_everything(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("guardoff", guard={"enabled": False})

    @app.task(name="unit.off", bind=True, shared=False)
    def off(self: Any) -> None:
        pass

    guard = guard_of(app)
    assert guard is not None and guard.valve is None
    guard.source = MemoryReadings(reading(memory=99.0))
    off.push_request(id="o-1", args=[], kwargs={}, delivery_info={"routing_key": "low"})
    try:
        off.before_start("o-1", [], {})
    finally:
        off.pop_request()
    assert redis_client.llen("low") == 0
