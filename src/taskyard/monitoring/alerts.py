"""Alert rules evaluated on each stats snapshot, and each alert's firing/resolved state.

Rules take their thresholds from ``MonitoringSettings`` (defaults of the service this platform
serves). :func:`evaluate` turns a snapshot into the breaches it shows; :func:`transition` moves
the stored alerts on: a new breach starts firing (``since``), a breach still present keeps its
``since`` and updates value and severity, a firing alert without a breach is resolved
(``resolved_at``). A later breach of a resolved alert starts a new episode. Both are pure
functions; :class:`AlertBook` keeps the state in Redis (``keys.alerts``) and the episodes in
the history database.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from taskyard.config import Settings
from taskyard.keys import Keys

#: Fewer finished tasks than this in one collection window say nothing about the slow-task rate.
MIN_SAMPLES = 5
#: Fewer cache lookups than this say nothing about the hit rate.
MIN_LOOKUPS = 20


@dataclass(frozen=True)
class Breach:
    """One rule breached now: what, how bad, by how much."""

    alertname: str
    severity: str
    value: float
    threshold: float
    summary: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        labels = ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return f"{self.alertname}{{{labels}}}"


def _level(value: float, warning: float, critical: float) -> tuple[str, float] | None:
    if value > critical:
        return "critical", critical
    if value > warning:
        return "warning", warning
    return None


def _resource_breaches(workers: list[dict[str, Any]], m: Any) -> Iterable[Breach]:
    for w in workers:
        host = str(w.get("hostname"))
        if not w.get("alive"):
            yield Breach("WorkerHeartbeatMissing", "critical", float(w.get("age_s") or 0.0),
                         0.0, f"worker {host} sent no heartbeat for {w.get('age_s', 0):.0f} s",
                         {"worker": host})
            continue
        for metric, name, warn, crit in (
            ("memory_pct", "WorkerMemoryHigh", m.alert_memory_warning_pct,
             m.alert_memory_critical_pct),
            ("cpu_pct", "WorkerCpuHigh", m.alert_cpu_warning_pct, m.alert_cpu_critical_pct),
        ):
            value = w.get(metric)
            if value is None:
                continue
            hit = _level(float(value), warn, crit)
            if hit is not None:
                what = metric.removesuffix("_pct")
                yield Breach(name, hit[0], float(value), hit[1],
                             f"worker {host} {what} at {float(value):.1f} % (> {hit[1]:g} %)",
                             {"worker": host})


def evaluate(snapshot: dict[str, Any], settings: Settings) -> list[Breach]:
    """Breaches shown by one snapshot (see ``taskyard.monitoring.collect`` for its shape)."""
    m = settings.monitoring
    breaches = list(_resource_breaches(snapshot.get("workers", []), m))
    for q in snapshot.get("queues", []):
        if q["depth"] > m.alert_queue_depth:
            breaches.append(Breach(
                "QueueDepthHigh", "warning", float(q["depth"]), float(m.alert_queue_depth),
                f"queue {q['queue']} holds {q['depth']} messages (> {m.alert_queue_depth})",
                {"queue": q["queue"]}))
    for s in snapshot.get("slow_statements", []):
        count = float(s.get("window_count", s.get("count", 0)))
        if count > m.alert_slow_queries:
            breaches.append(Breach(
                "SlowQueries", "warning", count, float(m.alert_slow_queries),
                f"{s['task']}: {count:.0f} slow statements in the last window "
                f"(> {m.alert_slow_queries})", {"task": str(s["task"])}))
    for c in snapshot.get("cache", []):
        hits, misses = int(c.get("hits") or 0), int(c.get("misses") or 0)
        rate = c.get("hit_rate_pct")
        if rate is None or hits + misses < MIN_LOOKUPS:
            continue
        if float(rate) < m.alert_cache_hit_rate_pct:
            breaches.append(Breach(
                "CacheHitRateLow", "warning", float(rate), m.alert_cache_hit_rate_pct,
                f"cache {c.get('namespace')} hit rate {float(rate):.1f} % "
                f"(< {m.alert_cache_hit_rate_pct:g} %)", {"namespace": str(c.get("namespace"))}))
    for t in snapshot.get("window", {}).get("tasks", []):
        finished, slow = int(t.get("finished", 0)), int(t.get("slow", 0))
        if finished < MIN_SAMPLES:
            continue
        rate = 100.0 * slow / finished
        if rate > m.alert_slow_task_rate_pct:
            breaches.append(Breach(
                "SlowTaskRate", "warning", round(rate, 2), m.alert_slow_task_rate_pct,
                f"{t['name']} on {t['queue']}: {rate:.0f} % of {finished} runs took over "
                f"{m.slow_task_s:g} s (> {m.alert_slow_task_rate_pct:g} %)",
                {"task": str(t["name"]), "queue": str(t["queue"])}))
    return breaches


def transition(previous: dict[str, dict[str, Any]], breaches: list[Breach], now: float
               ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The alerts after this evaluation, and those that changed (started, resolved, or changed
    severity) for the history."""
    current = {k: dict(v) for k, v in previous.items()}
    changed: list[dict[str, Any]] = []
    seen = set()
    for b in breaches:
        seen.add(b.id)
        old = current.get(b.id)
        firing = old is not None and old.get("state") == "firing"
        alert = {
            "id": b.id, "alertname": b.alertname, "severity": b.severity, "state": "firing",
            "since": old["since"] if firing and old else now, "resolved_at": None,
            "value": b.value, "threshold": b.threshold, "labels": dict(b.labels),
            "summary": b.summary, "updated_at": now,
        }
        current[b.id] = alert
        if not firing or (old and old.get("severity") != b.severity):
            changed.append(alert)
    for alert_id, alert in current.items():
        if alert_id not in seen and alert.get("state") == "firing":
            alert.update(state="resolved", resolved_at=now, updated_at=now)
            changed.append(alert)
    return current, changed


class AlertBook:
    """Alert state in Redis: ``keys.alerts`` HASH alert id -> JSON."""

    def __init__(self, client: Redis, keys: Keys) -> None:
        self.client = client
        self.key = keys.alerts()

    def load(self) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall(self.key)
        return {k.decode() if isinstance(k, bytes) else k: json.loads(v) for k, v in raw.items()}

    def save(self, alerts: dict[str, dict[str, Any]], now: float, retention_s: float) -> None:
        """Write every alert; drop resolved ones older than the retention."""
        stale = [k for k, a in alerts.items() if a.get("state") == "resolved"
                 and float(a.get("resolved_at") or now) < now - retention_s]
        with self.client.pipeline(transaction=True) as pipe:
            live = {k: json.dumps(a) for k, a in alerts.items() if k not in stale}
            if live:
                pipe.hset(self.key, mapping=live)  # type: ignore[arg-type]
            if stale:
                pipe.hdel(self.key, *stale)
            pipe.execute()
