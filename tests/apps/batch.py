"""Test app: batch functions that record what they receive, fail on demand, or run slowly."""

from __future__ import annotations

import json
import time
from typing import Any

from taskyard import PartialFailure, batch_task, create_app
from taskyard.runtime import runtime_of

# Short lease, fast reaper and retries so crash and retry tests finish in seconds. Resource
# guards off: on a busy test machine they would hold batches back and blur the timings.
SETTINGS: dict[str, Any] = {
    "batch": {"lease_s": 2.0, "reaper_interval_s": 0.2, "retry_backoff_s": 0.2, "max_retries": 2},
    "guard": {"enabled": False},
}

app = create_app("batchtest", include=["tests.apps.batch"], **SETTINGS)

PROCESSED = "test:batch:processed"  # LIST of JSON items, one entry per item processed
BATCHES = "test:batch:batches"  # LIST of JSON {"name", "size", "pid"}, one entry per call
STARTED = "test:batch:started"  # LIST: a slow batch started


def _redis() -> Any:
    return runtime_of(app).redis


def _record(name: str, items: list[Any]) -> None:
    pipe = _redis().pipeline(transaction=False)
    if items:
        pipe.rpush(PROCESSED, *[json.dumps(item, sort_keys=True) for item in items])
    pipe.rpush(BATCHES, json.dumps({"name": name, "size": len(items)}))
    pipe.execute()


@batch_task(batch_name="collect", batch_size=10, max_wait=0.5)
def collect(items: list[dict[str, Any]]) -> None:
    """Records every item."""
    _record("collect", items)


@batch_task(batch_name="by_tenant", batch_size=5, max_wait=0.5, key=lambda item: item["tenant"])
def by_tenant(items: list[dict[str, Any]]) -> None:
    """Records every item; all items of one call must share a tenant."""
    tenants = {item["tenant"] for item in items}
    assert len(tenants) == 1, tenants
    _record("by_tenant", items)


@batch_task(batch_name="slow", batch_size=20, max_wait=0.5)
def slow(items: list[dict[str, Any]]) -> None:
    """Marks its start, sleeps 1.5 s (a SIGKILL target), then records the items."""
    _redis().rpush(STARTED, json.dumps([item["i"] for item in items]))
    time.sleep(1.5)
    _record("slow", items)


@batch_task(batch_name="flaky", batch_size=4, max_wait=0.3)
def flaky(items: list[dict[str, Any]]) -> PartialFailure | None:
    """Item {"fail": k} fails its first k attempts (k = -1: always); the others succeed.

    Items with "whole": true make the whole batch raise instead of reporting a partial failure.
    """
    client = _redis()
    failed = []
    for index, item in enumerate(items):
        attempt = client.hincrby("test:batch:attempts", str(item["i"]), 1)
        if item.get("fail", 0) == -1 or attempt <= item.get("fail", 0):
            failed.append(index)
    if failed and any(items[i].get("whole") for i in failed):
        raise RuntimeError(f"batch failed on items {failed}")
    _record("flaky", [item for index, item in enumerate(items) if index not in failed])
    return PartialFailure(failed, "some items failed") if failed else None


@batch_task(batch_name="long", batch_size=2, max_wait=0.3, lease_s=0.6)
def long_running(items: list[dict[str, Any]]) -> None:
    """Runs 2 s, three times its lease: only the lease renewal keeps it from being republished."""
    time.sleep(2.0)
    _record("long", items)
