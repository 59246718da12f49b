"""The read side of monitoring: what the stats API, /metrics and the dashboard show.

Everything here reads Redis (live counters, heartbeats, series, alerts), the broker (queue
depth) and the history database (older series); nothing writes except the history schema
creation. Every method returns plain JSON-able dicts and lists and lets the client's error
(``redis.ConnectionError``, ...) propagate when Redis is down, so the API can answer 503.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from kombu.connection import Connection
from redis import Redis
from sqlalchemy.engine import Engine

from taskyard.batching import inspect_batches
from taskyard.cache.core import cache_stats
from taskyard.maintenance import recent_runs
from taskyard.monitoring import history
from taskyard.monitoring.capture import BUCKET_LABELS, BUCKETS, EVENTS, KINDS, SEP
from taskyard.monitoring.queues import (
    amqp_depths,
    broker_redis_client,
    is_redis_url,
    redis_depths,
)
from taskyard.monitoring.timeline import lookup
from taskyard.routing.levels import LEVEL_NAMES
from taskyard.runtime import Runtime
from taskyard.serialization import text

logger = logging.getLogger(__name__)

#: Series the stats collection writes (``keys.series(name)``), each a list of JSON snapshots.
SERIES: tuple[str, ...] = (
    "overview",
    "queues",
    "throughput",
    "latency",
    "tasks",
    "workers",
    "batches",
    "cache",
    "slow_statements",
    "guards",
    "maintenance",
    "alerts",
)
_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
_PERCENTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def quantile(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile (0-1) of a bucketed histogram, interpolating inside the bucket as
    Prometheus' ``histogram_quantile`` does; the overflow bucket reports its lower bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(BUCKETS):
                return BUCKETS[-1]
            lower = BUCKETS[i - 1] if i else 0.0
            return lower + (BUCKETS[i] - lower) * ((rank - seen) / n)
        seen += n
    return BUCKETS[-1]


def parse_counts(raw: dict[bytes, bytes]) -> dict[tuple[str, str], dict[str, int]]:
    """``task_counts`` HASH -> {(name, queue): {event: count}}."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for field, value in raw.items():
        name, queue, event = text(field).rsplit(SEP, 2)
        out.setdefault((name, queue), dict.fromkeys(EVENTS, 0))[event] = int(value)
    return out


def parse_histogram(raw: dict[bytes, bytes]) -> dict[tuple[str, str], dict[str, Any]]:
    """``task_histogram`` HASH -> {(name, queue): {"counts": [...], "sum": s, "count": n}}."""
    index = {label: i for i, label in enumerate(BUCKET_LABELS)}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for field, value in raw.items():
        name, queue, part = text(field).rsplit(SEP, 2)
        entry = out.setdefault((name, queue), {"counts": [0] * len(BUCKET_LABELS), "sum": 0.0})
        if part == "sum":
            entry["sum"] = float(value)
        elif part in index:
            entry["counts"][index[part]] = int(value)
    for entry in out.values():
        entry["count"] = sum(entry["counts"])
    return out


class StatsStore:
    """Read access to taskyard's live stats, series, alerts and history."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.keys = runtime.keys
        self._broker_redis: Redis | None = None
        self._engine: Engine | None = None

    @property
    def redis(self) -> Redis:
        return self.runtime.redis

    @property
    def engine(self) -> Engine:
        """History database engine, schema created on first use."""
        if self._engine is None:
            engine = history.engine_for(self.settings.effective_history_url)
            history.ensure_schema(engine)
            self._engine = engine
        return self._engine

    def _broker_client(self) -> Redis:
        broker = self.settings.effective_broker_url
        if broker == self.settings.effective_redis_url:
            return self.redis
        if self._broker_redis is None:
            self._broker_redis = broker_redis_client(broker, self.settings.broker_connect_timeout_s)
        return self._broker_redis

    # --- live readings -----------------------------------------------------------------------
    def queues(self) -> list[dict[str, Any]]:
        """Depth of the five queues: ready (all priority lists) plus reserved (unacked)."""
        broker = self.settings.effective_broker_url
        if is_redis_url(broker):
            from taskyard.monitoring.queue_age import oldest_ready_ages

            client = self._broker_client()
            depths = redis_depths(client, LEVEL_NAMES, namespace=self.settings.namespace)
            ages = oldest_ready_ages(client, LEVEL_NAMES)
        else:
            depths = amqp_depths(broker, LEVEL_NAMES, self.settings.broker_connect_timeout_s)
            ages = {}  # AMQP shows counts only, not the messages
        return [{**d.as_dict(), "oldest_ready_age_s": ages.get(d.queue)} for d in depths]

    def workers(self) -> list[dict[str, Any]]:
        """Known workers: their last heartbeat plus ``alive`` and ``age_s``."""
        now = time.time()
        raw_members: list[tuple[bytes, float]] = self.redis.zrange(
            self.keys.workers(), 0, -1, withscores=True
        )  # type: ignore[assignment]
        forget = self.settings.monitoring.worker_forget_after_s
        members = [(text(m), float(s)) for m, s in raw_members if now - float(s) <= forget]
        if not members:
            return []
        raws = self.redis.mget([self.keys.worker_heartbeat(h) for h, _ in members])
        out = []
        for (hostname, seen), raw in zip(members, raws, strict=True):
            beat: dict[str, Any] = {"hostname": hostname, "at": seen}
            if raw:
                try:
                    beat.update(json.loads(raw))
                except ValueError:
                    logger.warning("unreadable heartbeat of worker %s", hostname)
            at = float(beat.get("at") or seen)
            age = max(0.0, now - at)
            beat["age_s"] = round(age, 3)
            # The record expires with the heartbeat TTL: present means alive.
            beat["alive"] = bool(raw)
            out.append(beat)
        out.sort(key=lambda w: str(w["hostname"]))
        return out

    def _raw_stats(self) -> tuple[dict[bytes, bytes], dict[str, dict[bytes, bytes]]]:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.task_counts())
            for kind in KINDS:
                pipe.hgetall(self.keys.task_histogram(kind))
            replies = pipe.execute()
        return replies[0], dict(zip(KINDS, replies[1:], strict=True))

    def histograms(self) -> dict[str, Any]:
        """Raw histogram buckets per (name, queue), for Prometheus.

        ``{"buckets": [upper bounds (s)], "runtime": [{"name", "queue", "counts", "sum",
        "count"}], "wait": [...]}``; ``counts`` are per bucket (not cumulative) and have one
        more entry than ``buckets``: the overflow (+Inf) bucket.
        """
        return self.tasks_and_histograms()[1]

    def tasks(self) -> list[dict[str, Any]]:
        """Counters and latency percentiles (s) per task name and queue."""
        return self.tasks_and_histograms()[0]

    def tasks_and_histograms(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """:meth:`tasks` and :meth:`histograms` from one consistent read."""
        counts_raw, hists = self._raw_stats()
        parsed = {kind: parse_histogram(hists[kind]) for kind in KINDS}
        histograms: dict[str, Any] = {"buckets": list(BUCKETS)}
        for kind in KINDS:
            histograms[kind] = [
                {"name": name, "queue": queue, **entry}
                for (name, queue), entry in sorted(parsed[kind].items())
            ]
        return self._task_rows(counts_raw, parsed), histograms

    @staticmethod
    def _task_rows(
        counts_raw: dict[bytes, bytes], parsed: dict[str, dict[tuple[str, str], dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        counts = parse_counts(counts_raw)
        keys = set(counts) | set(parsed["runtime"]) | set(parsed["wait"])
        out = []
        for name, queue in sorted(keys):
            row: dict[str, Any] = {"name": name, "queue": queue}
            row.update(counts.get((name, queue), dict.fromkeys(EVENTS, 0)))
            for kind in KINDS:
                buckets = parsed[kind].get((name, queue), {}).get("counts", [])
                for label, q in _PERCENTILES:
                    row[f"{kind}_{label}"] = quantile(buckets, q) if buckets else None
            out.append(row)
        return out

    def batches(self) -> list[dict[str, Any]]:
        """Batch buffers, as :func:`taskyard.batching.inspect_batches` reports them."""
        return [dict(b) for b in inspect_batches(self.runtime)]

    def cache(self) -> list[dict[str, Any]]:
        """Cache namespaces with hits, misses and hit rate (percent)."""
        stats = cache_stats(self.runtime)
        return [{"namespace": ns, **dict(v)} for ns, v in sorted(stats.items())]

    def maintenance(self) -> list[dict[str, Any]]:
        """Recent maintenance runs, newest first: the run history the maintenance job keeps in
        the history database, else the reports the stats collection recorded from Redis."""
        runs = self._maintenance_history()
        if runs:
            return runs
        runs = self._series_redis("maintenance")
        if not runs:
            raw = self.redis.get(self.keys.maintenance_last())
            if raw:
                try:
                    runs = [json.loads(raw)]
                except ValueError:
                    logger.warning(
                        "unreadable maintenance report in %s", self.keys.maintenance_last()
                    )
        return runs[:50]

    def _maintenance_history(self) -> list[dict[str, Any]]:
        try:
            return [dict(r) for r in recent_runs(self.runtime, 50)]
        except Exception:
            logger.warning("maintenance run history unreadable; using Redis", exc_info=True)
            return []

    def alerts(self, include_resolved: bool = False) -> list[dict[str, Any]]:
        """Alerts, firing first (critical before warning), then newest first."""
        raw = self.redis.hgetall(self.keys.alerts())
        alerts = [json.loads(v) for v in raw.values()]
        if not include_resolved:
            alerts = [a for a in alerts if a.get("state") == "firing"]
        else:
            # Pending ones have not fired (their rule's for duration has not passed yet).
            alerts = [a for a in alerts if a.get("state") in ("firing", "resolved")]
        alerts.sort(
            key=lambda a: (
                a.get("state") != "firing",
                _SEVERITY_ORDER.get(a.get("severity", ""), 9),
                -float(a.get("since") or 0),
            )
        )
        return alerts

    def overview(self) -> dict[str, Any]:
        """One-glance summary: totals, depth per queue, workers, firing alerts, throughput,
        latency percentiles over all tasks (all time, and over the last collection window)."""
        counts_raw, raw_hists = self._raw_stats()
        parsed = {kind: parse_histogram(raw_hists[kind]) for kind in KINDS}
        tasks = self._task_rows(counts_raw, parsed)
        totals = {event: sum(int(t[event]) for t in tasks) for event in EVENTS}
        queues = self.queues()
        workers = self.workers()
        firing = self.alerts()
        latency: dict[str, float | None] = {}
        for kind in KINDS:
            merged = [0] * len(BUCKET_LABELS)
            for entry in parsed[kind].values():
                merged = [a + b for a, b in zip(merged, entry["counts"], strict=True)]
            for label, q in _PERCENTILES:
                latency[f"{kind}_{label}"] = quantile(merged, q)
        window = self._series_redis("latency", limit=1)
        latest = self._series_redis("throughput", limit=1)
        rates = latest[0] if latest else {}
        return {
            "at": time.time(),
            "totals": totals,
            "queues": {q["queue"]: q["depth"] for q in queues},
            "queue_depth_total": sum(q["depth"] for q in queues),
            "workers_alive": sum(1 for w in workers if w["alive"]),
            "workers_total": len(workers),
            "alerts_firing": len(firing),
            "alerts_critical": sum(1 for a in firing if a.get("severity") == "critical"),
            "deferred_by_reason": deferred_by_reason(workers),
            "throughput_per_s": float(rates.get("per_s", 0.0)),
            "succeeded_per_s": float(rates.get("succeeded_per_s", 0.0)),
            "failed_per_s": float(rates.get("failed_per_s", 0.0)),
            "latency": latency,
            # Percentiles over the last collection window (the "latency" series), when there is one.
            "latency_window": {k: v for k, v in (window[0] if window else {}).items() if k != "at"},
        }

    # --- series and history ------------------------------------------------------------------
    def _series_redis(self, name: str, limit: int = -1) -> list[dict[str, Any]]:
        end = -1 if limit < 0 else limit - 1
        return [json.loads(v) for v in self.redis.lrange(self.keys.series(name), 0, end)]

    def series(
        self,
        name: str,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Snapshots of series ``name`` in ``[since, until]``, newest first: the recent ones from
        Redis, older ones from the history database.

        Raises:
            ValueError: ``name`` is not a known series, or limit/offset are negative.
        """
        if name not in SERIES:
            raise ValueError(f"unknown series {name!r}; known series: {', '.join(SERIES)}")
        if limit < 0 or offset < 0:
            raise ValueError(f"limit={limit} and offset={offset} must not be negative")
        recent = self._series_redis(name)
        oldest = float(recent[-1]["at"]) if recent else None
        picked = [
            s
            for s in recent
            if (since is None or s["at"] >= since) and (until is None or s["at"] <= until)
        ]
        out = picked[offset : offset + limit]
        if len(out) >= limit:
            return out
        if oldest is not None and since is not None and since >= oldest:
            return out  # Redis covers the whole range
        # Older than what Redis keeps: the history database, strictly before Redis' oldest.
        db_until = until
        if oldest is not None:
            db_until = min(until, oldest - 1e-6) if until is not None else oldest - 1e-6
        db_offset = max(0, offset - len(picked))
        out.extend(
            history.read_snapshots(self.engine, name, since, db_until, limit - len(out), db_offset)
        )
        return out

    def sample_series(
        self, name: str, since: float, until: float, points: int
    ) -> list[dict[str, Any]]:
        """About ``points`` snapshots of series ``name`` spread over ``[since, until]``, newest
        first (a chart is a few hundred pixels wide: a sample draws the same lines as every
        snapshot, for a fraction of the reading).

        Reads only the sampled entries of the Redis list (one pipelined round trip of LINDEX);
        a range older than Redis keeps is sampled from the history database. Callers must not
        change the snapshots: they are shared between page builds (see :func:`_parse`).
        """
        key = self.keys.series(name)
        length = int(self.redis.llen(key))
        interval = float(self.settings.monitoring.stats_interval_s)
        within = min(length, int((until - since) / interval) + 2)
        if within <= 0:
            return self.series(name, since, None, points, 0)
        with self.redis.pipeline(transaction=False) as pipe:
            for index in sample_indices(length, within, points):
                pipe.lindex(key, index)
            raws = pipe.execute()
        out = [_parse(raw) for raw in raws if raw]
        picked = [snap for snap in out if float(snap.get("at", 0)) >= since]
        if len(picked) == len(out) and length <= within and out:
            # Redis ends inside the window: older snapshots come from the history database
            # (straight from it: self.series would parse the whole Redis list first).
            before = float(out[-1]["at"]) - 1e-6
            # Rows in [since, before]: all rows up to before, less those before since.
            count = history.count_snapshots(self.engine, name, before) - history.count_snapshots(
                self.engine, name, since - 1e-6
            )
            stride = max(1, math.ceil(count / max(1, points // 2)))
            for offset in range(0, count, stride):
                picked.extend(history.read_snapshots(self.engine, name, since, before, 1, offset))
        return picked

    def covered_since(self) -> float | None:
        """Time of the oldest ``overview`` snapshot kept (Redis or the history database)."""
        oldest: float | None = None
        # Redis keeps the newest snapshots (newest first): the list's tail is its oldest.
        raw = self.redis.lindex(self.keys.series("overview"), -1)
        if raw:
            oldest = float(json.loads(raw)["at"])
        count = history.count_snapshots(self.engine, "overview")
        if count:
            rows = history.read_snapshots(self.engine, "overview", None, None, 1, count - 1)
            if rows:
                at = float(rows[0]["at"])
                oldest = at if oldest is None else min(oldest, at)
        return oldest

    def timeline(self, task_id: str) -> dict[str, Any] | None:
        """The task lookup's timeline of ``task_id`` (history database and pending events)."""
        return lookup(self.runtime, self.engine, task_id)

    def alert_changes(self, limit: int = 100) -> list[dict[str, Any]]:
        """Recent alert state changes (fired, severity changed, resolved), newest first, from the
        capped Redis list the stats collection writes."""
        return [
            json.loads(raw)
            for raw in self.redis.lrange(self.keys.alert_history(), 0, max(0, limit - 1))
        ]

    def alert_history(self, limit: int = 100) -> list[dict[str, Any]]:
        """Alert episodes from the history database, most recent first."""
        return history.read_alert_episodes(self.engine, limit)

    # --- readiness ---------------------------------------------------------------------------
    def check_ready(self) -> dict[str, str | None]:
        """None per part that answers, else the error text: Redis, history database, broker."""
        result: dict[str, str | None] = {}
        try:
            self.redis.ping()
            result["redis"] = None
        except Exception as exc:
            result["redis"] = f"{type(exc).__name__}: {exc}"
        try:
            history.check(self.engine)
            result["database"] = None
        except Exception as exc:
            self._engine = None
            result["database"] = f"{type(exc).__name__}: {exc}"
        broker = self.settings.effective_broker_url
        try:
            if is_redis_url(broker):
                self._broker_client().ping()
            else:
                timeout = self.settings.broker_connect_timeout_s
                with Connection(broker, connect_timeout=timeout) as conn:
                    conn.ensure_connection(max_retries=1)
            result["broker"] = None
        except Exception as exc:
            result["broker"] = f"{type(exc).__name__}: {exc}"
        return result


#: Parsed snapshots by their raw JSON: snapshots never change once written, so a page build
#: parses only those it has not seen (bounded; the oldest entries go first).
_PARSED: dict[bytes, dict[str, Any]] = {}
_PARSED_MAX = 4096


def _parse(raw: bytes) -> dict[str, Any]:
    parsed = _PARSED.get(raw)
    if parsed is None:
        parsed = json.loads(raw)
        if len(_PARSED) >= _PARSED_MAX:
            for old in list(_PARSED)[: _PARSED_MAX // 4]:
                del _PARSED[old]
        _PARSED[raw] = parsed
    return parsed


def sample_indices(length: int, within: int, points: int) -> list[int]:
    """List indices (0 = newest) of about ``points`` entries among the newest ``within``.

    The stride is anchored at the list's oldest end, so as new snapshots are pushed at the head
    the same older snapshots stay picked (and parsed once), plus always the newest.
    """
    if within <= 0:
        return []
    stride = max(1, math.ceil(within / points))
    return sorted({0, *(i for i in range(within) if (length - 1 - i) % stride == 0)})


def deferred_by_reason(workers: list[dict[str, Any]]) -> dict[str, int]:
    """Deferrals per reason (memory, requires_memory), summed over the workers' heartbeats."""
    totals: dict[str, int] = {}
    for worker in workers:
        for reason, count in (worker.get("deferred_by_reason") or {}).items():
            totals[str(reason)] = totals.get(str(reason), 0) + int(count or 0)
    return totals
