"""Inspection and the dead-letter store: plain dicts for the CLI, the stats API and Prometheus."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from taskyard.batching.buffer import BatchBuffer
from taskyard.batching.producer import publish
from taskyard.errors import BatchError
from taskyard.runtime import Runtime, TaskyardApp, runtime_of
from taskyard.serialization import text

#: Counters kept per batch name and group (``Keys.batch_stats``), all reported (0 when unset).
COUNTERS = (
    "processed",
    "batches",
    "failed",
    "retries",
    "dead_items",
    "dead_batches",
    "duplicates",
    "duplicate_items",
    "lease_expired",
    "republished",
    "busy_deliveries",
    "requeued",
    "purged_items",
    "crashed",
    "flush_size",
    "flush_age",
    "flush_manual",
)


def _runtime(runtime_or_app: Runtime | TaskyardApp) -> Runtime:
    return runtime_or_app if isinstance(runtime_or_app, Runtime) else runtime_of(runtime_or_app)


def batch_names(runtime_or_app: Runtime | TaskyardApp) -> list[str]:
    """Batch names that ever buffered items (sorted)."""
    runtime = _runtime(runtime_or_app)
    return sorted(text(n) for n in runtime.redis.smembers(runtime.keys.batch_registry()))


def _empty_group(group: str) -> dict[str, Any]:
    return {
        "group": group,
        "buffered": 0,
        "oldest_age_s": None,
        "in_flight": 0,
        "in_flight_items": 0,
        "dead": 0,
        "dead_items": 0,
        "flush_reasons": {},
        **{c: 0 for c in COUNTERS},
    }


def inspect_batch(runtime_or_app: Runtime | TaskyardApp, batch_name: str) -> dict[str, Any]:
    """State of one batch name: totals plus one entry per group (key-function value).

    Keys of the result and of each group: ``buffered`` items waiting, ``oldest_age_s`` (None
    when nothing waits), ``in_flight`` batches and ``in_flight_items``, ``dead`` batches and
    ``dead_items``, the counters of :data:`COUNTERS` (processed and failed items, ...) and
    ``flush_reasons`` ({"size": n, "age": n, "manual": n}). The result also has
    ``batch_name``, ``pending`` (items counted against ``max_buffered``), ``max_buffered``,
    ``batch_size``, ``max_wait_s``, ``level``, ``task``, ``stale_deliveries`` and ``groups``.
    """
    runtime = _runtime(runtime_or_app)
    buffer = BatchBuffer(runtime.redis, runtime.keys, batch_name)
    snap = buffer.snapshot()
    conf = {
        text(k): text(v)
        for k, v in runtime.redis.hgetall(runtime.keys.batch_conf(batch_name)).items()
    }
    now = snap["now_ms"]
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: _empty_group(""))
    for group, buffered, oldest in snap["groups"]:
        entry = groups[group]
        entry["buffered"] = buffered
        if oldest is not None and buffered:
            entry["oldest_age_s"] = max(0.0, (now - oldest) / 1000)
    for group, _state, size in snap["inflight"]:
        groups[group]["in_flight"] += 1
        groups[group]["in_flight_items"] += size
    for group, _state, size in snap["dead"]:
        groups[group]["dead"] += 1
        groups[group]["dead_items"] += size
    stale = 0
    for field, count in snap["stats"].items():
        counter, sep, group = field.partition(":")
        if not sep:
            stale += count if counter == "stale_deliveries" else 0
            continue
        entry = groups[group]
        entry[counter] = count
        if counter.startswith("flush_"):
            entry["flush_reasons"][counter.removeprefix("flush_")] = count
    rows = []
    for group in sorted(groups):
        entry = groups[group]
        entry["group"] = group
        rows.append(entry)
    totals: dict[str, Any] = _empty_group("")
    del totals["group"]
    ages = [r["oldest_age_s"] for r in rows if r["oldest_age_s"] is not None]
    totals["oldest_age_s"] = max(ages) if ages else None
    for row in rows:
        for name, value in row.items():
            if name in ("group", "oldest_age_s"):
                continue
            if name == "flush_reasons":
                for reason, count in value.items():
                    totals[name][reason] = totals[name].get(reason, 0) + count
            else:
                totals[name] += value
    return {
        "batch_name": batch_name,
        "task": conf.get("task"),
        "level": conf.get("level"),
        "batch_size": int(conf["batch_size"]) if "batch_size" in conf else None,
        "max_wait_s": int(conf["max_wait_ms"]) / 1000 if "max_wait_ms" in conf else None,
        "max_buffered": int(conf["max_buffered"]) if "max_buffered" in conf else None,
        "pending": snap["pending"],
        "stale_deliveries": stale,
        **totals,
        "groups": rows,
    }


def inspect_batches(runtime_or_app: Runtime | TaskyardApp) -> list[dict[str, Any]]:
    """State of every batch name (see :func:`inspect_batch`), sorted by name."""
    runtime = _runtime(runtime_or_app)
    return [inspect_batch(runtime, name) for name in batch_names(runtime)]


def list_dead(
    runtime_or_app: Runtime | TaskyardApp,
    batch_name: str | None = None,
    *,
    items: int = 3,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Dead batches (of one batch name, or all): id, group, size, attempts, error, died_at (s
    since epoch) and the first ``items`` items."""
    runtime = _runtime(runtime_or_app)
    names = [batch_name] if batch_name else batch_names(runtime)
    out = []
    for name in names:
        buffer = BatchBuffer(runtime.redis, runtime.keys, name)
        for batch_id in buffer.dead_ids(limit):
            meta = buffer.describe(batch_id, items=items)
            if meta is None:
                continue
            out.append(
                {
                    "batch_name": name,
                    "batch_id": batch_id,
                    "group": meta.get("group", ""),
                    "size": int(meta.get("size", 0)),
                    "attempts": int(meta.get("attempts", 0)),
                    "deliveries": int(meta.get("deliveries", 0)),
                    "error": meta.get("error", ""),
                    "died_at": int(meta.get("died", 0)) / 1000,
                    "items": meta.get("items", []),
                }
            )
    return out


def _conf(runtime: Runtime, batch_name: str) -> dict[str, str]:
    conf = {
        text(k): text(v)
        for k, v in runtime.redis.hgetall(runtime.keys.batch_conf(batch_name)).items()
    }
    if not conf:
        raise BatchError(
            f"batch {batch_name!r} is unknown: no definition in Redis "
            f"(known: {', '.join(batch_names(runtime)) or 'none'})"
        )
    return conf


def requeue_dead(
    app: TaskyardApp, batch_name: str, batch_ids: list[str] | None = None
) -> list[str]:
    """Put dead batches (all of ``batch_name`` when ``batch_ids`` is None) back in flight with
    fresh retries, and publish them; returns the ids requeued."""
    runtime = runtime_of(app)
    conf = _conf(runtime, batch_name)
    buffer = BatchBuffer(runtime.redis, runtime.keys, batch_name)
    requeued = []
    for batch_id in batch_ids if batch_ids is not None else buffer.dead_ids(100_000):
        claim = buffer.requeue(str(batch_id), int(conf["lease_ms"]))
        if claim is not None:
            requeued.append(claim)
    publish(app, conf["task"], conf["level"], batch_name, requeued, None)
    return [c.batch_id for c in requeued]


def purge_dead(
    runtime_or_app: Runtime | TaskyardApp, batch_name: str, batch_ids: list[str] | None = None
) -> int:
    """Delete dead batches for good (all of ``batch_name`` when ``batch_ids`` is None);
    returns the number of items deleted."""
    runtime = _runtime(runtime_or_app)
    buffer = BatchBuffer(runtime.redis, runtime.keys, batch_name)
    total = 0
    for batch_id in batch_ids if batch_ids is not None else buffer.dead_ids(100_000):
        total += max(0, buffer.purge(str(batch_id)))
    return total
