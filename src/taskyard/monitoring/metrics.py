"""``/metrics``: Prometheus exposition of the stats store, read at scrape time.

A custom collector turns the store's rows into metric families on each scrape; each API instance
has its own :class:`~prometheus_client.CollectorRegistry`, so nothing leaks between apps through
prometheus_client's global registry. Names follow celery-exporter where one exists
(``celery_task_succeeded_total{name,queue_name}``, ``celery_queue_length{queue_name}``) and
``taskyard_`` otherwise; values are in base units (seconds, counts, percent as documented).
Every collector of the API is here: :class:`StoreCollector` over the stats store and
:class:`DeadLetterCollector` (``taskyard_dead_tasks{queue_name,name,reason}``, entries waiting in
state "dead"; dead batches stay in ``taskyard_batch_dead_batches``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from taskyard.monitoring.alerts import host_of
from taskyard.monitoring.api.state import ApiState, StatsSource
from taskyard.serialization import text

log = logging.getLogger(__name__)

#: The classic text format: every name here is a legal legacy name, so every scraper reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


#: Task events the store counts -> (metric name without _total, help).
TASK_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("received", "celery_task_received", "Tasks received by a worker."),
    ("started", "celery_task_started", "Tasks started by a worker."),
    ("succeeded", "celery_task_succeeded", "Tasks that succeeded."),
    ("failed", "celery_task_failed", "Tasks that failed."),
    ("retried", "celery_task_retried", "Tasks that asked to be retried."),
    ("deferred", "taskyard_task_deferred", "Tasks held back by a resource guard."),
)

HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("runtime", "celery_task_runtime_seconds", "Task runtime (started -> finished)."),
    ("wait", "celery_task_wait_seconds", "Queue wait of a task (sent -> started)."),
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None if value is None else float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class StoreCollector(Collector):
    """Collects every taskyard metric from a stats store when the registry is scraped."""

    def __init__(self, store: StatsSource) -> None:
        self.store = store

    def describe(self) -> Iterable[Metric]:
        # Families are known only at scrape time; describing nothing keeps registration free of
        # I/O (the registry is created with auto_describe=False).
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._queues(self.store.queues())
        tasks = self.store.tasks()
        yield from self._task_counters(tasks)
        yield from self._histograms(self.store.histograms())
        yield from self._workers(self.store.workers())
        yield from self._batches(self.store.batches())
        yield from self._cache(self.store.cache())
        yield from self._alerts(self.store.alerts(include_resolved=False))

    @staticmethod
    def _queues(rows: list[dict[str, Any]]) -> Iterator[Metric]:
        length = GaugeMetricFamily(
            "celery_queue_length",
            "Messages in a queue: every priority sub-list plus reserved, unacknowledged ones.",
            labels=["queue_name"],
        )
        ready = GaugeMetricFamily(
            "taskyard_queue_ready_messages", "Messages waiting in a queue.", labels=["queue_name"]
        )
        reserved = GaugeMetricFamily(
            "taskyard_queue_reserved_messages",
            "Messages delivered to a worker and not yet acknowledged.",
            labels=["queue_name"],
        )
        scheduled = GaugeMetricFamily(
            "taskyard_queue_scheduled_messages",
            "Messages with a countdown or ETA waiting in the broker-side delayed set.",
            labels=["queue_name"],
        )
        oldest = GaugeMetricFamily(
            "taskyard_queue_oldest_ready_age_seconds",
            "Seconds the oldest ready message of a queue has waited (absent when empty).",
            labels=["queue_name"],
        )
        for row in rows:
            queue = [text(row.get("queue"))]
            for family, key in (
                (length, "depth"),
                (ready, "ready"),
                (reserved, "reserved"),
                (scheduled, "scheduled"),
                (oldest, "oldest_ready_age_s"),
            ):
                value = _number(row.get(key))
                if value is not None:
                    family.add_metric(queue, value)
        yield from (length, ready, reserved, scheduled, oldest)

    @staticmethod
    def _task_counters(rows: list[dict[str, Any]]) -> Iterator[Metric]:
        for key, name, documentation in TASK_COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=["name", "queue_name"])
            for row in rows:
                value = _number(row.get(key))
                if value is not None:
                    family.add_metric([text(row.get("name")), text(row.get("queue"))], value)
            yield family

    @staticmethod
    def _histograms(data: Mapping[str, Any]) -> Iterator[Metric]:
        for kind, name, documentation in HISTOGRAMS:
            family = HistogramMetricFamily(name, documentation, labels=["name", "queue_name"])
            for series in histogram_series(data, kind):
                family.add_metric(
                    [series["name"], series["queue"]], series["buckets"], series["sum"]
                )
            yield family
        # Per queue, over all task names: what an autoscaler of one worker profile reads.
        per_queue = HistogramMetricFamily(
            "taskyard_queue_wait_seconds",
            "Queue wait (sent -> started) of the tasks of a queue, all task names.",
            labels=["queue_name"],
        )
        for queue, (buckets, total) in sorted(queue_wait(data).items()):
            per_queue.add_metric([queue], buckets, total)
        yield per_queue

    @staticmethod
    def _workers(rows: list[dict[str, Any]]) -> Iterator[Metric]:
        alive = GaugeMetricFamily("celery_workers_alive", "Workers whose heartbeat is current.")
        up = GaugeMetricFamily(
            "celery_worker_up", "1 while a worker's heartbeat is current.", labels=["hostname"]
        )
        memory = GaugeMetricFamily(
            "taskyard_worker_memory_percent",
            "Worker memory use, percent of its limit.",
            labels=["hostname"],
        )
        cpu = GaugeMetricFamily(
            "taskyard_worker_cpu_percent",
            "Worker CPU use, percent, averaged over the guard window.",
            labels=["hostname"],
        )
        deferred = CounterMetricFamily(
            "taskyard_worker_deferred",
            "Tasks a worker deferred (re-published) since it "
            "started, per reason: memory, requires_memory.",
            labels=["hostname", "reason"],
        )
        paused = GaugeMetricFamily(
            "taskyard_worker_paused_queue",
            "1 for each queue a worker holds back, with why: memory, cpu or cpu-critical.",
            labels=["hostname", "queue_name", "reason"],
        )
        count = 0
        for row in rows:
            host = [text(row.get("hostname"))]
            is_alive = bool(row.get("alive"))
            count += is_alive
            up.add_metric(host, 1.0 if is_alive else 0.0)
            for family, kind in ((memory, "memory"), (cpu, "cpu")):
                value = worker_percent(row, kind)
                if value is not None:
                    family.add_metric(host, value)
            for reason, n in sorted((row.get("deferred_by_reason") or {}).items()):
                number = _number(n)
                if number is not None:
                    deferred.add_metric([*host, text(reason)], number)
            if is_alive:
                for queue, reason in sorted((row.get("paused_reasons") or {}).items()):
                    paused.add_metric([*host, text(queue), text(reason)], 1.0)
        alive.add_metric([], float(count))
        yield from (alive, up, memory, cpu, deferred, paused, *_host_families(rows))

    @staticmethod
    def _batches(rows: list[dict[str, Any]]) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "buffered": GaugeMetricFamily(
                "taskyard_batch_buffered_items",
                "Items waiting in a batch buffer.",
                labels=["batch_name"],
            ),
            "in_flight": GaugeMetricFamily(
                "taskyard_batch_in_flight_batches",
                "Claimed batches not yet finished.",
                labels=["batch_name"],
            ),
            "dead": GaugeMetricFamily(
                "taskyard_batch_dead_batches",
                "Batches that exhausted their retries.",
                labels=["batch_name"],
            ),
            "processed": CounterMetricFamily(
                "taskyard_batch_processed_items",
                "Batch items processed successfully.",
                labels=["batch_name"],
            ),
            "failed": CounterMetricFamily(
                "taskyard_batch_failed_items",
                "Batch items of failed batch runs.",
                labels=["batch_name"],
            ),
        }
        totals: dict[str, dict[str, float]] = {key: {} for key in families}
        for row in rows:
            # Grouped buffers of one batch name add up: the label is the batch name.
            batch = text(row.get("batch_name"))
            for key in families:
                value = _number(row.get(key))
                if value is not None:
                    totals[key][batch] = totals[key].get(batch, 0.0) + value
        for key, family in families.items():
            for batch, value in totals[key].items():
                family.add_metric([batch], value)
            yield family

    @staticmethod
    def _cache(rows: list[dict[str, Any]]) -> Iterator[Metric]:
        hits = CounterMetricFamily(
            "taskyard_cache_hits", "Cache reads served from Redis.", labels=["namespace"]
        )
        misses = CounterMetricFamily(
            "taskyard_cache_misses", "Cache reads that recomputed.", labels=["namespace"]
        )
        for row in rows:
            namespace = [text(row.get("namespace"))]
            for family, key in ((hits, "hits"), (misses, "misses")):
                value = _number(row.get(key))
                if value is not None:
                    family.add_metric(namespace, value)
        yield from (hits, misses)

    @staticmethod
    def _alerts(rows: list[dict[str, Any]]) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "taskyard_alert_active", "1 for each firing alert.", labels=["alertname", "severity"]
        )
        firing: dict[tuple[str, str], float] = {}
        for row in rows:
            if row.get("state") != "firing":
                continue
            key = (text(row.get("alertname")), text(row.get("severity")))
            # Several instances of one rule (one per worker, say) share a series: count them.
            firing[key] = firing.get(key, 0.0) + 1.0
        for (alertname, severity), value in sorted(firing.items()):
            active.add_metric([alertname, severity], value)
        yield active


def _host_families(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    """Memory and CPU per machine: the highest reading of its live workers (they read the same
    host a moment apart), what the host-level alert rules are written over."""
    memory = GaugeMetricFamily(
        "taskyard_host_memory_percent",
        "Memory use of a worker host (or its cgroup), percent.",
        labels=["host"],
    )
    cpu = GaugeMetricFamily(
        "taskyard_host_cpu_percent",
        "CPU busy of a worker host (or its cgroup), percent, every process "
        "included, averaged over the guard window.",
        labels=["host"],
    )
    readings: dict[str, dict[str, float]] = {}
    for row in rows:
        if not row.get("alive"):
            continue
        seen = readings.setdefault(host_of(row), {})
        for name, keys in (("memory", ("memory_pct",)), ("cpu", ("host_cpu_pct", "cpu_pct"))):
            value = next((v for k in keys if (v := _number(row.get(k))) is not None), None)
            if value is not None:
                seen[name] = max(seen.get(name, value), value)
    for host, values in sorted(readings.items()):
        for family, name in ((memory, "memory"), (cpu, "cpu")):
            if name in values:
                family.add_metric([host], values[name])
    yield from (memory, cpu)


def worker_percent(row: Mapping[str, Any], kind: str) -> float | None:
    """A worker's ``memory`` or ``cpu`` percent from its heartbeat (``memory_pct``,
    ``cpu_pct``)."""
    return _number(row.get(f"{kind}_pct"))


def histogram_series(data: Mapping[str, Any], kind: str) -> Iterator[dict[str, Any]]:
    """Cumulative Prometheus buckets of one histogram kind from :meth:`StatsStore.histograms`.

    The store gives the upper bounds once (``data["buckets"]``) and per (name, queue) the count
    in each bucket, not cumulative, with one extra entry for the overflow (+Inf) bucket.
    """
    bounds = [float(b) for b in data.get("buckets") or ()]
    labels = [*(_bound(b) for b in bounds), "+Inf"]
    for row in data.get(kind) or ():
        counts = [_number(c) or 0.0 for c in row.get("counts") or ()]
        counts = (counts + [0.0] * len(labels))[: len(labels)]
        cumulative, running = [], 0.0
        for label, count in zip(labels, counts, strict=True):
            running += count
            cumulative.append((label, running))
        yield {
            "name": text(row.get("name")),
            "queue": text(row.get("queue")),
            "buckets": cumulative,
            "sum": _number(row.get("sum")) or 0.0,
        }


def queue_wait(data: Mapping[str, Any]) -> dict[str, tuple[list[tuple[str, float]], float]]:
    """The wait histogram summed over task names, per queue: cumulative buckets and sum."""
    out: dict[str, tuple[list[tuple[str, float]], float]] = {}
    for series in histogram_series(data, "wait"):
        queue = series["queue"]
        if queue not in out:
            out[queue] = ([(label, 0.0) for label, _ in series["buckets"]], 0.0)
        buckets, total = out[queue]
        summed = [
            (label, have + count)
            for (label, have), (_, count) in zip(buckets, series["buckets"], strict=True)
        ]
        out[queue] = (summed, total + series["sum"])
    return out


def _bound(value: float) -> str:
    # Prometheus' own rendering of a bucket bound ("0.005", "1.0", "60.0").
    return repr(float(value))


class DeadLetterCollector(Collector):
    """``taskyard_dead_tasks``, read at scrape time; an unreachable store leaves it out."""

    def __init__(self, counts: Callable[[], dict[tuple[str, str, str], int]]) -> None:
        self.counts = counts

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "taskyard_dead_tasks",
            "Dead letters waiting for an operator (state dead).",
            labels=["queue_name", "name", "reason"],
        )
        try:
            counts = self.counts()
        except Exception:
            log.warning("metrics: dead-letter counts unreadable", exc_info=True)
            return
        for (queue, name, reason), n in sorted(counts.items()):
            family.add_metric([queue, name, reason], float(n))
        yield family


def metrics_registry(store: StatsSource) -> CollectorRegistry:
    """A registry of its own holding one collector over ``store``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return registry


def add_metrics_route(api: FastAPI, state: ApiState) -> None:
    """Serve ``/metrics`` from ``state.store`` through the API's response cache."""
    registry = metrics_registry(state.store)
    registry.register(DeadLetterCollector(lambda: state.dead_letters().counts()))
    # Collectors other parts added before this route (flow control, job control, Redis memory).
    for collector in state.extras.get("collectors", ()):
        registry.register(collector)

    @api.get(
        "/metrics",
        tags=["metrics"],
        response_class=Response,
        responses={
            200: {
                "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                "description": "Prometheus text exposition format 0.0.4.",
            }
        },
    )
    async def metrics(request: Request) -> Response:
        """Prometheus metrics of queues, tasks, workers, batches, cache and alerts."""
        return await state.respond(
            request, "metrics", lambda: generate_latest(registry), media_type=CONTENT_TYPE
        )
