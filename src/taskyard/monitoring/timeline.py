"""Task timelines: what happened to one task id, persisted in the history database.

The capture buffers one packed event per step of a task (sent, received, started, deferred,
retried, succeeded, failed, revoked, dead) in process and its background flush appends them to
a capped Redis list (``Keys.timeline_pending``) in the same round trip as the counters; the
stats collection moves them into the history database (``taskyard_task_events``) and prunes
rows older than ``TASKYARD_DEAD_LETTERS__TIMELINE_RETENTION_S``. A lookup reads both, so a task is
found the moment its events are flushed, and still after Redis or Flower restarted.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from redis.client import Pipeline
from sqlalchemy.engine import Engine

from taskyard.monitoring import history
from taskyard.runtime import Runtime

logger = logging.getLogger(__name__)

#: Separator of a packed event's fields: task_id, at, event, name, queue, worker, detail.
SEP = "\x1f"
#: Events in the order a timeline is usually read; "state" is the last of these seen.
EVENTS: tuple[str, ...] = (
    "sent",
    "received",
    "started",
    "deferred",
    "retried",
    "succeeded",
    "failed",
    "revoked",
    "dead",
    "cancelled",
)
_TERMINAL = ("succeeded", "failed", "revoked", "dead", "cancelled")
#: What became of a cancelled task, as the cancel record says (taskyard.broker.control).
_CANCEL_OUTCOMES = {
    "dropped": "never started: dropped at reservation",
    "skipped": "never started: skipped before running",
    "stopped": "stopped by the task (cancel_requested)",
    "terminated": "terminated after the grace period",
    "superseded": "never started: replaced by a later debounced call",
}
#: Events not yet moved that a lookup reads at most (the newest).
_LOOKUP_PENDING = 50_000
#: Events moved per database transaction.
_DRAIN_CHUNK = 5000


def pack(
    task_id: str, at: float, event: str, name: str, queue: str, worker: str, detail: str = ""
) -> str:
    """One event as stored in Redis (cheap: one join)."""
    return SEP.join((task_id, f"{at:.6f}", event, name, queue, worker, detail.replace(SEP, " ")))


def unpack(packed: str | bytes) -> dict[str, Any] | None:
    text = packed.decode(errors="replace") if isinstance(packed, bytes) else packed
    parts = text.split(SEP)
    if len(parts) != 7:
        return None
    try:
        at = float(parts[1])
    except ValueError:
        return None
    # Cut to the column widths (history.task_events): a longer value must not fail the insert
    # of its whole chunk, again at every collection.
    return {
        "task_id": parts[0][:255],
        "at": at,
        "event": parts[2][:32],
        "name": parts[3][:255],
        "queue": parts[4][:255],
        "worker": parts[5][:255],
        "detail": parts[6][:2000],
    }


def append(pipe: Pipeline, runtime: Runtime, events: list[str]) -> None:
    """Queue the RPUSH and cap of ``events`` on ``pipe`` (the capture's flush pipeline)."""
    key = runtime.keys.timeline_pending()
    for start in range(0, len(events), 1000):
        pipe.rpush(key, *events[start : start + 1000])
    pipe.ltrim(key, -runtime.settings.dead_letters.timeline_max_pending, -1)


def _take(runtime: Runtime, n: int) -> list[bytes]:
    key = runtime.keys.timeline_pending()
    # MULTI/EXEC: read and remove the same head, so two collections never move an event twice.
    with runtime.redis.pipeline(transaction=True) as pipe:
        pipe.lrange(key, 0, n - 1)
        pipe.ltrim(key, n, -1)
        taken, _ = pipe.execute()
    return list(taken)


def drain(runtime: Runtime, engine: Engine, limit: int = 200_000) -> int:
    """Move pending events from Redis into the history database; returns how many.

    A failed insert puts the chunk back at the head of the list (order kept), for the next run.
    """
    moved = 0
    while moved < limit:
        taken = _take(runtime, _DRAIN_CHUNK)
        if not taken:
            break
        rows = [row for row in map(unpack, taken) if row is not None]
        try:
            if rows:
                with engine.begin() as conn:
                    conn.execute(history.task_events.insert(), rows)
        except Exception:
            runtime.redis.lpush(runtime.keys.timeline_pending(), *reversed(taken))
            raise
        moved += len(rows)
        if len(taken) < _DRAIN_CHUNK:
            break
    return moved


def prune(engine: Engine, now: float, retention_s: float) -> int:
    """Delete events older than the retention; returns rows deleted."""
    with engine.begin() as conn:
        result = conn.execute(
            history.task_events.delete().where(history.task_events.c.at < now - retention_s)
        )
    return int(result.rowcount or 0)


def lookup(
    runtime: Runtime, engine: Engine | None, task_id: str, limit: int = 1000
) -> dict[str, Any] | None:
    """The timeline of ``task_id`` (database rows and events not yet moved), or None."""
    events: list[dict[str, Any]] = []
    if engine is not None:
        history.ensure_schema(engine)
        t = history.task_events
        query = (
            sa.select(t.c.at, t.c.event, t.c.name, t.c.queue, t.c.worker, t.c.detail)
            .where(t.c.task_id == task_id)
            .order_by(t.c.at, t.c.id)
            .limit(limit)
        )
        with engine.connect() as conn:
            events.extend(dict(row._mapping) for row in conn.execute(query))
    try:
        # The newest events only: the collection moves the list every stats interval, so this
        # is seconds of events; a list that piled up (no collection running) is not read whole.
        pending = runtime.redis.lrange(runtime.keys.timeline_pending(), -_LOOKUP_PENDING, -1)
    except Exception:
        logger.warning("timeline: pending events unreadable", exc_info=True)
        pending = []
    prefix = task_id + SEP
    for packed in pending:
        text = packed.decode(errors="replace") if isinstance(packed, bytes) else str(packed)
        if text.startswith(prefix):
            row = unpack(text)
            if row is not None:
                row.pop("task_id")
                events.append(row)
    if not events:
        return None
    events.sort(key=lambda e: e["at"])
    return summarize(task_id, events)


def with_job_state(
    runtime: Runtime, task_id: str, found: dict[str, Any] | None
) -> dict[str, Any] | None:
    """``found`` (a :func:`lookup` result or None) with the task's cancel record and progress.

    A task whose cancel took effect gets a "cancelled" event (when, by what, what became of it)
    and the state ``cancelled``; ``cancel`` and ``progress`` are added (None when absent).
    """
    control = getattr(runtime, "jobs", None)
    if control is None:
        return found
    try:
        record = control.store.record(task_id)
        progress = control.read_progress(task_id)
    except Exception:
        logger.warning("timeline: job state of %s unreadable", task_id, exc_info=True)
        return found
    if record is None and progress is None:
        return found
    events = list(found["events"]) if found else []
    outcome = (record or {}).get("outcome")
    if record is not None and outcome in _CANCEL_OUTCOMES:
        events.append(
            {
                "at": float(record.get("outcome_at") or record.get("at") or 0.0),
                "event": "cancelled",
                "name": str(record.get("name") or (found or {}).get("name") or ""),
                "queue": "",
                "worker": "",
                "detail": f"by {record.get('by')}: {_CANCEL_OUTCOMES[outcome]}",
            }
        )
        events.sort(key=lambda e: e["at"])
    result = summarize(task_id, events) if events else {"task_id": task_id, "events": []}
    result["cancel"] = record
    result["progress"] = progress
    return result


def summarize(task_id: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    """Timeline plus its summary: name, queue, state (the latest step), counts per event."""
    counts = {name: 0 for name in EVENTS}
    for event in events:
        counts[event["event"]] = counts.get(event["event"], 0) + 1
    terminal = [e for e in events if e["event"] in _TERMINAL]
    latest = terminal[-1] if terminal else events[-1]
    # A task fails, then is recorded dead in the same instant (the failure hook runs before
    # the postrun that reports "failed"): dead is where it ended.
    state = "dead" if counts["dead"] else latest["event"]
    if counts.get("cancelled"):
        state = "cancelled"
    name = next((e["name"] for e in reversed(events) if e["name"]), "")
    queue = next((e["queue"] for e in reversed(events) if e["queue"]), "")
    started = next((e["at"] for e in events if e["event"] == "started"), None)
    return {
        "task_id": task_id,
        "name": name,
        "queue": queue,
        "state": state,
        "first_at": events[0]["at"],
        "last_at": events[-1]["at"],
        "started_at": started,
        "counts": counts,
        "events": events,
    }
