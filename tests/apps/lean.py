"""Test app for the lean execution path: tasks and signal receivers that write what they saw."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import signals

from taskyard import create_app, priority_task
from taskyard.runtime import runtime_of

app = create_app("leantest")

SEEN = "test:lean:seen"  # LIST of JSON records: signals, runs, requests
ATTEMPTS = "test:lean:attempts"  # HASH key -> runs so far
GATE = "test:lean:gate"  # while set, hold() waits


def _record(kind: str, **fields: Any) -> None:
    runtime_of(app).redis.rpush(SEEN, json.dumps({"kind": kind, **fields}, default=str))


def _attempt(key: str) -> int:
    return int(runtime_of(app).redis.hincrby(ATTEMPTS, key, 1))


@signals.task_received.connect
def _received(sender: Any = None, request: Any = None, **_: Any) -> None:
    _record("received", id=request.id, name=request.name, cls=type(request).__name__)


@signals.task_prerun.connect
def _prerun(task_id: str | None = None, **_: Any) -> None:
    _record("prerun", id=task_id)


@signals.task_postrun.connect
def _postrun(task_id: str | None = None, state: str | None = None, **_: Any) -> None:
    _record("postrun", id=task_id, state=state)


@signals.task_success.connect
def _success(sender: Any = None, result: Any = None, **_: Any) -> None:
    _record("success", id=sender.request.id, result=result)


@signals.task_failure.connect
def _failure(task_id: str | None = None, exception: Any = None, **_: Any) -> None:
    _record("failure", id=task_id, exception=type(exception).__name__)


@signals.task_retry.connect
def _retry(request: Any = None, reason: Any = None, **_: Any) -> None:
    _record("retry", id=request.id, reason=str(reason))


@priority_task(priority="normal", name="leantest.add")
def add(a: int, b: int) -> int:
    return a + b


@priority_task(priority="high", name="leantest.whoami", bind=True)
def whoami(self: Any, *args: Any, **kwargs: Any) -> None:
    """Records what ``self.request`` says inside a bound task."""
    request = self.request
    _record(
        "request",
        id=request.id,
        args=list(request.args),
        kwargs=request.kwargs,
        hostname=request.hostname,
        routing_key=(request.delivery_info or {}).get("routing_key"),
        retries=request.retries,
        root_id=request.root_id,
        is_eager=request.is_eager,
        pid=os.getpid(),
    )


@priority_task(priority="normal", name="leantest.boom")
def boom(key: str) -> None:
    _attempt(key)
    raise ValueError(f"boom {key}")


@priority_task(priority="normal", name="leantest.retry_later", bind=True, max_retries=3)
def retry_later(self: Any, key: str, countdown: float) -> str:
    """Retries once with a countdown (a broker-side delay), then succeeds."""
    _record("attempt", key=key, at=time.time(), retries=self.request.retries)
    if self.request.retries == 0:
        raise self.retry(countdown=countdown)
    return f"done {key}"


@priority_task(
    priority="normal",
    name="leantest.flaky",
    bind=True,
    autoretry_for=(KeyError,),
    retry_kwargs={"max_retries": 4, "countdown": 0.2},
)
def flaky(self: Any, key: str, failures: int) -> str:
    """Raises KeyError ``failures`` times (autoretry), then succeeds."""
    if _attempt(key) <= failures:
        raise KeyError(key)
    return f"ok {key}"


@priority_task(priority="normal", name="leantest.hold", bind=True)
def hold(self: Any, key: str) -> None:
    """Counts a run, then waits while the gate is set."""
    _attempt(key)
    client = runtime_of(app).redis
    while client.exists(GATE):
        time.sleep(0.05)
    _record("held", key=key, id=self.request.id)


@priority_task(priority="low", name="leantest.count")
def count(key: str, sleep_s: float = 0.0) -> None:
    if sleep_s:
        time.sleep(sleep_s)
    _attempt(key)
