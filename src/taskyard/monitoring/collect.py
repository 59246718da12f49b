"""Stats collection: the periodic task ``taskyard.stats.collect``.

Every ``stats_interval_s`` one run (single-flight across beats and workers) reads everything the
platform publishes (true queue depths, worker heartbeats with resource and guard readings, task
counters and histograms, slow statements, batch buffers, cache hit rates, maintenance reports),
derives rates and window percentiles against the previous run, evaluates the alert rules, and
writes:

* one JSON snapshot per series into Redis (``keys.series(name)``, LPUSH + LTRIM to
  ``series_length``), the recent past the API and dashboard read;
* the same snapshots and the alert episodes into the history database, rolled up and pruned
  once per ``history_rollup_s``.

The run is on the critical level: it takes milliseconds, and the guards never hold critical work
back, so a memory or heartbeat alert is not delayed by the pressure it reports.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from typing import Any

from taskyard.beat import job_interval_s, single_flight
from taskyard.config import Settings
from taskyard.monitoring import history, timeline
from taskyard.monitoring.alerts import AlertBook, evaluate, timing_of, transition
from taskyard.monitoring.capture import BUCKET_LABELS, BUCKETS, KINDS
from taskyard.monitoring.queues import STATS_TASK
from taskyard.monitoring.redis_memory import RedisReader
from taskyard.monitoring.store import SERIES, StatsStore, quantile
from taskyard.routing.levels import Priority
from taskyard.runtime import PeriodicJob, Runtime, TaskyardApp
from taskyard.serialization import text

logger = logging.getLogger(__name__)

TASK_NAME = STATS_TASK
_PERCENTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
_FINISHED = ("succeeded", "failed", "retried")


def _slow_buckets(slow_task_s: float) -> list[int]:
    """Histogram buckets whose every value exceeds ``slow_task_s`` (exact when it is a bound)."""
    return [i for i in range(len(BUCKET_LABELS)) if i > 0 and BUCKETS[i - 1] >= slow_task_s]


def _slow_statements(runtime: Runtime, previous: dict[str, Any]) -> list[dict[str, Any]]:
    """Slow statements per task, counted in Redis by the tasks' database engine
    (``keys.slow_statements()``: "<task>" -> count, "<task>\\x1fseconds" -> total s)."""
    key_of = getattr(runtime.keys, "slow_statements", None)
    if key_of is None:
        return []
    raw = {text(k): float(v) for k, v in runtime.redis.hgetall(key_of()).items()}
    before = previous.get("slow_statements", {})
    first = "at" not in previous  # no previous reading: no window to count in
    out = []
    for name, count in sorted(raw.items()):
        if "\x1f" in name:
            continue
        total = int(count)
        out.append(
            {
                "task": name,
                "count": total,
                "seconds": raw.get(f"{name}\x1fseconds", 0.0),
                "window_count": 0 if first else max(0, total - int(before.get(name, 0))),
            }
        )
    return out


def _pg_stat_statements(url: str, slow_s: float) -> list[dict[str, Any]]:
    """Slowest statements by mean time from pg_stat_statements, where that extension is
    installed in the application database; empty elsewhere."""
    if not url.startswith("postgresql"):
        return []
    import sqlalchemy as sa

    engine = history.engine_for(url)
    with engine.connect() as conn:
        installed = conn.execute(
            sa.text("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'")
        ).first()
        if not installed:
            return []
        try:
            rows = (
                conn.execute(
                    sa.text(
                        "SELECT left(query, 300) AS query, calls, mean_exec_time, total_exec_time "
                        "FROM pg_stat_statements WHERE mean_exec_time > :ms "
                        "ORDER BY mean_exec_time DESC LIMIT 20"
                    ),
                    {"ms": slow_s * 1000.0},
                )
                .mappings()
                .all()
            )
        except sa.exc.DBAPIError as exc:
            # Created but not in shared_preload_libraries: the view exists and cannot be read.
            logger.debug("stats: pg_stat_statements unreadable: %s", exc)
            return []
    return [
        {
            "query": r["query"],
            "calls": int(r["calls"]),
            "mean_s": float(r["mean_exec_time"]) / 1000.0,
            "total_s": float(r["total_exec_time"]) / 1000.0,
        }
        for r in rows
    ]


def _window(
    tasks: list[dict[str, Any]],
    hists: dict[str, Any],
    previous: dict[str, Any],
    now: float,
    slow_task_s: float,
) -> dict[str, Any]:
    """Rates and percentiles over the time since the previous run, from counter deltas."""
    prev_at = previous.get("at")
    seconds = max(1e-6, now - float(prev_at)) if prev_at else None
    prev_counts: dict[str, dict[str, int]] = previous.get("counts", {})
    prev_hist: dict[str, dict[str, list[int]]] = previous.get("hist", {})
    slow_idx = _slow_buckets(slow_task_s)
    totals = dict.fromkeys(("received", "started", *_FINISHED, "deferred"), 0)
    per_task = []
    merged = {kind: [0] * len(BUCKET_LABELS) for kind in KINDS}
    for row in tasks:
        key = f"{row['name']}\x1f{row['queue']}"
        before = prev_counts.get(key, {})
        for event in totals:
            totals[event] += max(0, int(row[event]) - int(before.get(event, 0)))
    for kind in KINDS:
        for entry in hists[kind]:
            key = f"{entry['name']}\x1f{entry['queue']}"
            before_counts = prev_hist.get(kind, {}).get(key, [0] * len(BUCKET_LABELS))
            delta = [max(0, a - b) for a, b in zip(entry["counts"], before_counts, strict=False)]
            merged[kind] = [a + b for a, b in zip(merged[kind], delta, strict=True)]
            if kind == "runtime":
                per_task.append(
                    {
                        "name": entry["name"],
                        "queue": entry["queue"],
                        "finished": sum(delta),
                        "slow": sum(delta[i] for i in slow_idx),
                        # Percentiles of this window's runs only (the task rows' are all-time).
                        **{
                            f"runtime_{label}": quantile(delta, q) if sum(delta) else None
                            for label, q in _PERCENTILES
                        },
                    }
                )
    latency: dict[str, float | None] = {}
    for kind in KINDS:
        for label, q in _PERCENTILES:
            latency[f"{kind}_{label}"] = quantile(merged[kind], q)
    rates = {
        f"{event}_per_s": (round(n / seconds, 3) if seconds else 0.0) for event, n in totals.items()
    }
    finished = totals["succeeded"] + totals["failed"]
    rates["per_s"] = round(finished / seconds, 3) if seconds else 0.0
    if seconds is None:
        # First run: no previous reading, so no window; all-time counts would mislead alerts.
        per_task = []
        latency = dict.fromkeys(latency)
    return {
        "seconds": seconds,
        "totals": totals,
        "rates": rates,
        "latency": latency,
        "tasks": per_task,
    }


def collect(runtime: Runtime, now: float | None = None) -> dict[str, Any]:
    """Take one snapshot, evaluate alerts, write series and history; returns a summary."""
    now = time.time() if now is None else now
    settings, keys, client = runtime.settings, runtime.keys, runtime.redis
    m = settings.monitoring
    store = StatsStore(runtime)
    raw_prev = client.get(keys.stats_state())
    previous: dict[str, Any] = json.loads(raw_prev) if raw_prev else {}

    queues = store.queues()
    workers = store.workers()
    tasks, hists = store.tasks_and_histograms()
    batches = _guarded("batches", store.batches, [])
    cache = _guarded("cache", store.cache, [])
    slow = _guarded("slow statements", lambda: _slow_statements(runtime, previous), [])
    pg_slow = _guarded(
        "pg_stat_statements",
        lambda: _pg_stat_statements(settings.database_url, settings.maintenance.slow_statement_s),
        [],
    )
    window = _window(tasks, hists, previous, now, m.slow_task_s)
    redis_rows = _guarded("redis memory", lambda: _redis_memory(runtime, previous), [])
    maintenance_bytes = client.get(keys.maintenance_last())
    maintenance_raw = text(maintenance_bytes) if maintenance_bytes else None

    snapshot = {
        "at": now,
        "queues": queues,
        "workers": workers,
        "cache": cache,
        "slow_statements": slow,
        "window": window,
        "redis": redis_rows,
    }
    book = AlertBook(client, keys)
    alerts, changed = transition(book.load(), evaluate(snapshot, settings), now, timing_of(m))
    book.save(alerts, now, m.history_retention_days * 86_400.0, changed, m.alert_history_length)
    firing = [a for a in alerts.values() if a["state"] == "firing"]

    totals = {
        e: sum(int(t[e]) for t in tasks)
        for e in ("received", "started", "succeeded", "failed", "retried", "deferred")
    }
    series: dict[str, dict[str, Any]] = {
        "overview": {
            "totals": totals,
            "queue_depth_total": sum(q["depth"] for q in queues),
            "workers_alive": sum(1 for w in workers if w["alive"]),
            "workers_total": len(workers),
            "alerts_firing": len(firing),
            "throughput_per_s": window["rates"]["per_s"],
        },
        "queues": {
            "queues": {
                q["queue"]: {k: q[k] for k in ("depth", "ready", "reserved")} for q in queues
            }
        },
        "throughput": {
            **window["rates"],
            "window_s": window["seconds"],
            "tasks": [
                {
                    **t,
                    "per_s": round(t["finished"] / window["seconds"], 3)
                    if window["seconds"]
                    else 0.0,
                }
                for t in window["tasks"]
            ],
        },
        "latency": window["latency"],
        "tasks": {"tasks": tasks},
        "workers": {"workers": workers},
        "batches": {"batches": batches},
        "cache": {"cache": cache},
        "slow_statements": {"tasks": slow, "pg_stat_statements": pg_slow},
        "guards": {
            "workers": [
                {
                    k: w.get(k)
                    for k in (
                        "hostname",
                        "host",
                        "alive",
                        "state",
                        "paused_queues",
                        "paused_reasons",
                        "deferred",
                        "deferred_by_reason",
                        "overdue",
                        "pool_nice",
                    )
                }
                for w in workers
            ]
        },
        "alerts": {"firing": len(firing), "alerts": firing},
    }
    if maintenance_raw and maintenance_raw != previous.get("maintenance"):
        try:
            series["maintenance"] = json.loads(maintenance_raw)
        except ValueError:
            logger.warning("stats: unreadable maintenance report in %s", keys.maintenance_last())
    entries = {name: {**data, "at": now} for name, data in series.items() if name in SERIES}

    state = {
        "at": now,
        "counts": {f"{t['name']}\x1f{t['queue']}": {e: t[e] for e in totals} for t in tasks},
        "hist": {
            kind: {f"{h['name']}\x1f{h['queue']}": h["counts"] for h in hists[kind]}
            for kind in KINDS
        },
        "slow_statements": {s["task"]: s["count"] for s in slow},
        "maintenance": maintenance_raw,
        "rolled_up_at": previous.get("rolled_up_at", 0.0),
        "redis_evicted": {r["redis"]: r["evicted_keys"] for r in redis_rows},
    }
    # Dead-letter retention and the transport's quarantine: the workers' dead-letter upkeep
    # (taskyard.deadletters.upkeep), which needs neither beat nor this job.
    history_error = _write_history(runtime, entries, changed, now, state)
    with client.pipeline(transaction=False) as pipe:
        for name, entry in entries.items():
            pipe.lpush(keys.series(name), json.dumps(entry))
            pipe.ltrim(keys.series(name), 0, m.series_length - 1)
        pipe.set(keys.stats_state(), json.dumps(state))
        # Workers silent for longer than this are forgotten (and their missing alert resolves).
        pipe.zremrangebyscore(keys.workers(), "-inf", now - m.worker_forget_after_s)
        pipe.execute()
    return {
        "at": now,
        "series": sorted(entries),
        "alerts_firing": len(firing),
        "alerts_changed": [f"{a['id']}:{a['state']}" for a in changed],
        "history_error": history_error,
    }


#: Each runtime's reader of Redis memory (its clients kept between collections), by id: the
#: weak reference tells a new runtime at a reused id from the one the reader was made for.
_readers: dict[int, tuple[weakref.ref[Runtime], RedisReader]] = {}


def _redis_memory(runtime: Runtime, previous: dict[str, Any]) -> list[dict[str, Any]]:
    """Memory readings of the broker's and buffers' Redis, with the keys each evicted since the
    previous collection (a restarted Redis counts from zero again)."""
    cached = _readers.get(id(runtime))
    if cached is None or cached[0]() is not runtime:
        cached = (weakref.ref(runtime), RedisReader(runtime.settings))
        _readers[id(runtime)] = cached
    reader = cached[1]
    before = previous.get("redis_evicted", {})
    rows = reader.readings()
    for row in rows:
        count = row["evicted_keys"]
        last = int(before.get(row["redis"], count))
        row["evicted_recently"] = count if count < last else count - last
    return rows


def _guarded(what: str, read: Any, default: Any) -> Any:
    """A reading from another subsystem; its failure leaves a gap, not a failed collection."""
    try:
        return read()
    except Exception:
        logger.warning("stats: reading %s failed", what, exc_info=True)
        return default


def _write_history(
    runtime: Runtime,
    entries: dict[str, dict[str, Any]],
    changed: list[dict[str, Any]],
    now: float,
    state: dict[str, Any],
) -> str | None:
    """Snapshots and alert episodes into the history database, with rollup and retention once
    per rollup window; a database outage is logged and reported, Redis keeps the series."""
    m = runtime.settings.monitoring
    try:
        engine = history.engine_for(runtime.settings.effective_history_url)
        history.ensure_schema(engine)
        history.write_snapshots(engine, ((name, now, e) for name, e in entries.items()))
        history.save_alerts(engine, changed)
        timeline.drain(runtime, engine)
        if now - float(state["rolled_up_at"]) >= m.history_rollup_s:
            history.rollup(engine, now, m.history_raw_keep_s, m.history_rollup_s)
            history.prune(engine, now, m.history_retention_days * 86_400.0)
            timeline.prune(engine, now, runtime.settings.dead_letters.timeline_retention_s)
            state["rolled_up_at"] = now
    except Exception as exc:
        logger.warning("stats: writing history failed", exc_info=True)
        return f"{type(exc).__name__}: {exc}"
    return None


def periodic_jobs(settings: Settings) -> dict[str, PeriodicJob]:
    """Stats collection's periodic job, for beat."""
    return {TASK_NAME: PeriodicJob(settings.monitoring.stats_interval_s)}


def register(app: TaskyardApp, runtime: Runtime) -> None:
    """Register ``taskyard.stats.collect`` on ``app`` (no I/O)."""

    def collect_task() -> dict[str, Any]:
        interval = job_interval_s(runtime, TASK_NAME)
        with single_flight(
            runtime, "stats.collect", interval, lock_ttl_s=max(5.0, 3 * interval)
        ) as flight:
            if not flight.acquired:
                return flight.report()
            return collect(runtime)

    # shared=False: the task belongs to this app only, whatever other apps the process makes.
    app.task(name=TASK_NAME, ignore_result=True, shared=False, taskyard_level=Priority.CRITICAL)(
        collect_task
    )
