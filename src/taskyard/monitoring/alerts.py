"""Alert rules evaluated on each stats snapshot, with Prometheus semantics, and their history.

Rules take their thresholds from ``MonitoringSettings`` (defaults of the service this platform
serves). :func:`evaluate` turns a snapshot into the conditions it shows (:class:`Breach`);
:func:`transition` moves the stored alerts on as Prometheus does:

* a new condition makes a **pending** alert (``active_since``); it **fires** once the condition
  has held for the rule's ``for_s`` (``since``), and a pending alert whose condition goes away
  is dropped without ever having fired;
* a firing alert whose condition goes away keeps firing until it has been gone for the rule's
  ``resolve_s`` (Prometheus' ``keep_firing_for``), then it is **resolved** (``resolved_at``);
  the condition coming back within that delay continues the same episode;
* a firing alert escalates to a higher severity at once, and steps back down only after the
  higher condition has been gone for ``resolve_s``.

So a reading that hovers around a threshold neither fires nor resolves an alert on every
collection. Host-level readings (memory, CPU) make one alert per host, not one per worker: the
workers of one machine read the same memory and CPU. Every state change (fired, severity
changed, resolved) goes into a capped Redis list (``keys.alert_history``) for the stats API and
the dashboard, and into the history database's alert episodes. The same rules ship as a
Prometheus rules file over ``/metrics`` (``deploy/prometheus/taskyard-rules.yml``).

Both :func:`evaluate` and :func:`transition` are pure; :class:`AlertBook` keeps the state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from taskyard.config import MonitoringSettings, Settings
from taskyard.keys import Keys
from taskyard.serialization import text

#: Fewer finished tasks than this in one collection window say nothing about the slow-task rate.
MIN_SAMPLES = 5
#: Fewer cache lookups than this say nothing about the hit rate.
MIN_LOOKUPS = 20
SEVERITIES = {"warning": 1, "critical": 2}

PENDING, FIRING, RESOLVED = "pending", "firing", "resolved"


@dataclass(frozen=True)
class Breach:
    """One rule's condition holding now: what, how bad, by how much."""

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


@dataclass(frozen=True)
class Timing:
    """How long a rule's condition must hold before it fires, and be gone before it resolves."""

    for_s: float
    resolve_s: float


def timing_of(m: MonitoringSettings) -> Callable[[str], Timing]:
    """Per-rule timing: ``alert_timing`` overrides over ``alert_for_s``/``alert_resolve_s``."""

    def timing(alertname: str) -> Timing:
        rule = m.alert_timing.get(alertname, {})
        return Timing(
            float(rule.get("for_s", m.alert_for_s)), float(rule.get("resolve_s", m.alert_resolve_s))
        )

    return timing


def _level(value: float, warning: float, critical: float) -> tuple[str, float] | None:
    if value > critical:
        return "critical", critical
    if value > warning:
        return "warning", warning
    return None


def host_of(worker: dict[str, Any]) -> str:
    """The machine a worker runs on: its heartbeat's ``host``, else its node name's host part."""
    host = worker.get("host")
    if host:
        return str(host)
    return str(worker.get("hostname") or "").rpartition("@")[2] or "unknown"


def _resource_breaches(workers: list[dict[str, Any]], m: Any) -> Iterable[Breach]:
    by_host: dict[str, list[dict[str, Any]]] = {}
    for w in workers:
        name = str(w.get("hostname"))
        if not w.get("alive"):
            yield Breach(
                "WorkerHeartbeatMissing",
                "critical",
                float(w.get("age_s") or 0.0),
                0.0,
                f"worker {name} sent no heartbeat for {w.get('age_s', 0):.0f} s",
                {"worker": name},
            )
            continue
        by_host.setdefault(host_of(w), []).append(w)
    for host, members in sorted(by_host.items()):
        names = sorted(str(w.get("hostname")) for w in members)
        for keys, name, what, warn, crit in (
            (
                ("memory_pct",),
                "HostMemoryHigh",
                "memory",
                m.alert_memory_warning_pct,
                m.alert_memory_critical_pct,
            ),
            # The whole host's CPU (host_cpu_pct); cpu_pct of older heartbeats leaves out the
            # reading worker's own processes.
            (
                ("host_cpu_pct", "cpu_pct"),
                "HostCpuHigh",
                "CPU",
                m.alert_cpu_warning_pct,
                m.alert_cpu_critical_pct,
            ),
        ):
            values = [
                float(v)
                for w in members
                if (v := next((w[k] for k in keys if w.get(k) is not None), None)) is not None
            ]
            if not values:
                continue
            # The workers of one host read the same figure a moment apart: the highest counts.
            value = max(values)
            hit = _level(value, warn, crit)
            if hit is not None:
                readers = ", ".join(names) if len(names) <= 3 else f"{len(names)} workers"
                yield Breach(
                    name,
                    hit[0],
                    round(value, 2),
                    hit[1],
                    f"host {host} {what} at {value:.1f} % (> {hit[1]:g} %), read by {readers}",
                    {"host": host},
                )


def evaluate(snapshot: dict[str, Any], settings: Settings) -> list[Breach]:
    """Breaches shown by one snapshot (see ``taskyard.monitoring.collect`` for its shape)."""
    m = settings.monitoring
    breaches = list(_resource_breaches(snapshot.get("workers", []), m))
    for q in snapshot.get("queues", []):
        if q["depth"] > m.alert_queue_depth:
            breaches.append(
                Breach(
                    "QueueDepthHigh",
                    "warning",
                    float(q["depth"]),
                    float(m.alert_queue_depth),
                    f"queue {q['queue']} holds {q['depth']} messages (> {m.alert_queue_depth})",
                    {"queue": q["queue"]},
                )
            )
    for r in snapshot.get("redis", []):
        if r.get("evicted_recently"):
            breaches.append(
                Breach(
                    "RedisEvicting",
                    "critical",
                    float(r["evicted_recently"]),
                    0.0,
                    f"the {r['redis']} Redis evicted {r['evicted_recently']} keys since the last "
                    f"collection (maxmemory-policy {r['policy']}): queued work may be lost; set "
                    "noeviction",
                    {"redis": str(r["redis"])},
                )
            )
        limit = float(r.get("maxmemory") or 0)
        if limit > 0:
            used_pct = 100.0 * float(r["used_memory"]) / limit
            if used_pct > m.alert_redis_memory_pct:
                breaches.append(
                    Breach(
                        "RedisMemoryHigh",
                        "warning",
                        round(used_pct, 1),
                        m.alert_redis_memory_pct,
                        f"the {r['redis']} Redis uses {used_pct:.0f} % of its maxmemory "
                        f"(> {m.alert_redis_memory_pct:g} %): at 100 % it refuses writes or "
                        "evicts",
                        {"redis": str(r["redis"])},
                    )
                )
    for s in snapshot.get("slow_statements", []):
        count = float(s.get("window_count", s.get("count", 0)))
        if count > m.alert_slow_queries:
            breaches.append(
                Breach(
                    "SlowQueries",
                    "warning",
                    count,
                    float(m.alert_slow_queries),
                    f"{s['task']}: {count:.0f} slow statements in the last window "
                    f"(> {m.alert_slow_queries})",
                    {"task": str(s["task"])},
                )
            )
    for c in snapshot.get("cache", []):
        hits, misses = int(c.get("hits") or 0), int(c.get("misses") or 0)
        rate = c.get("hit_rate_pct")
        if rate is None or hits + misses < MIN_LOOKUPS:
            continue
        if float(rate) < m.alert_cache_hit_rate_pct:
            breaches.append(
                Breach(
                    "CacheHitRateLow",
                    "warning",
                    float(rate),
                    m.alert_cache_hit_rate_pct,
                    f"cache {c.get('namespace')} hit rate {float(rate):.1f} % "
                    f"(< {m.alert_cache_hit_rate_pct:g} %)",
                    {"namespace": str(c.get("namespace"))},
                )
            )
    for t in snapshot.get("window", {}).get("tasks", []):
        finished, slow = int(t.get("finished", 0)), int(t.get("slow", 0))
        if finished < MIN_SAMPLES:
            continue
        rate = 100.0 * slow / finished
        if rate > m.alert_slow_task_rate_pct:
            breaches.append(
                Breach(
                    "SlowTaskRate",
                    "warning",
                    round(rate, 2),
                    m.alert_slow_task_rate_pct,
                    f"{t['name']} on {t['queue']}: {rate:.0f} % of {finished} runs took over "
                    f"{m.slow_task_s:g} s (> {m.alert_slow_task_rate_pct:g} %)",
                    {"task": str(t["name"]), "queue": str(t["queue"])},
                )
            )
    return breaches


def transition(
    previous: dict[str, dict[str, Any]],
    breaches: list[Breach],
    now: float,
    timing: Callable[[str], Timing] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The alerts after this evaluation, and those whose state changed (fired, changed
    severity, resolved) for the history. Without ``timing`` every rule fires and resolves at
    once."""
    timing = timing or (lambda _name: Timing(0.0, 0.0))
    current = {k: dict(v) for k, v in previous.items()}
    changed: list[dict[str, Any]] = []
    seen = set()
    for b in breaches:
        seen.add(b.id)
        rule = timing(b.alertname)
        old = current.get(b.id)
        state = old.get("state") if old else None
        alert: dict[str, Any] = (
            dict(old)
            if old and state in (PENDING, FIRING)
            else {
                "id": b.id,
                "alertname": b.alertname,
                "state": PENDING,
                "active_since": now,
                "since": None,
                "resolved_at": None,
                "severity": b.severity,
                "severity_at": now,
            }
        )
        alert.update(
            value=b.value,
            threshold=b.threshold,
            labels=dict(b.labels),
            summary=b.summary,
            updated_at=now,
            last_seen=now,
            for_s=rule.for_s,
            resolve_s=rule.resolve_s,
        )
        rank, held = SEVERITIES.get(b.severity, 0), SEVERITIES.get(alert["severity"], 0)
        severity_changed = False
        if rank >= held:
            severity_changed = rank > held
            alert["severity"], alert["severity_at"] = b.severity, now
        elif now - float(alert.get("severity_at") or now) >= rule.resolve_s:
            # The higher condition has been gone long enough: step down.
            severity_changed = True
            alert["severity"], alert["severity_at"] = b.severity, now
        if alert["state"] == PENDING and now - float(alert["active_since"]) >= rule.for_s:
            alert.update(state=FIRING, since=now)
            changed.append(alert)
        elif alert["state"] == FIRING and severity_changed:
            changed.append(alert)
        current[b.id] = alert
    for alert_id, alert in list(current.items()):
        if alert_id in seen:
            continue
        if alert.get("state") == PENDING:
            # Never fired: nothing to resolve, nothing for the history.
            del current[alert_id]
        elif alert.get("state") == FIRING:
            resolve_s = timing(str(alert.get("alertname"))).resolve_s
            last_seen = float(alert.get("last_seen") or alert.get("updated_at") or now)
            if now - last_seen >= resolve_s:
                alert.update(state=RESOLVED, resolved_at=now, updated_at=now)
                changed.append(alert)
    return current, changed


def history_entry(alert: dict[str, Any], now: float) -> dict[str, Any]:
    """One state change as kept in the Redis history list."""
    return {
        "at": now,
        **{
            k: alert.get(k)
            for k in (
                "id",
                "alertname",
                "state",
                "severity",
                "since",
                "resolved_at",
                "value",
                "threshold",
                "labels",
                "summary",
            )
        },
    }


class AlertBook:
    """Alert state in Redis (``keys.alerts`` HASH alert id -> JSON) and the capped history list
    of state changes (``keys.alert_history``)."""

    def __init__(self, client: Redis, keys: Keys) -> None:
        self.client = client
        self.key = keys.alerts()
        self.history_key = keys.alert_history()

    def load(self) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall(self.key)
        return {text(k): json.loads(v) for k, v in raw.items()}

    def save(
        self,
        alerts: dict[str, dict[str, Any]],
        now: float,
        retention_s: float,
        changed: list[dict[str, Any]] | None = None,
        history_length: int = 500,
    ) -> None:
        """Write every alert, drop resolved ones older than the retention and ones gone from
        ``alerts`` (a pending alert whose condition went away); record ``changed``."""
        stale = [
            k
            for k, a in alerts.items()
            if a.get("state") == RESOLVED and float(a.get("resolved_at") or now) < now - retention_s
        ]
        stored = {text(k) for k in self.client.hkeys(self.key)}
        gone = [k for k in stored if k not in alerts]
        with self.client.pipeline(transaction=True) as pipe:
            live = {k: json.dumps(a) for k, a in alerts.items() if k not in stale}
            if live:
                pipe.hset(self.key, mapping=live)  # type: ignore[arg-type]
            if stale or gone:
                pipe.hdel(self.key, *stale, *gone)
            if changed:
                pipe.lpush(self.history_key, *(json.dumps(history_entry(a, now)) for a in changed))
                pipe.ltrim(self.history_key, 0, history_length - 1)
            pipe.execute()

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        """Recent state changes, newest first."""
        return [json.loads(raw) for raw in self.client.lrange(self.history_key, 0, limit - 1)]
