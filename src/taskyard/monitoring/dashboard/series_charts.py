"""Time charts per task name and per worker, from the snapshots of the stats collection.

The ``tasks`` series holds each task name's cumulative counters per snapshot; a rate is the
difference between two consecutive snapshots over the time between them (a counter that went
down, after a Redis flush, restarts from zero rather than showing a negative rate). The
``workers`` series holds every worker's heartbeat reading per snapshot.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Literal

from taskyard.monitoring.dashboard.charts import Line, TimeChart, time_chart
from taskyard.monitoring.dashboard.rows import TasksSnapshot, WorkersSnapshot

#: Snapshots of a big series (``tasks``: every task name's counters) read for one chart: rates
#: between sampled snapshots are as true as between consecutive ones, at a fraction of the read.
SAMPLED_POINTS = 48
#: Snapshots drawn per chart of the other series (a chart is a few hundred pixels wide).
CHART_POINTS = 240

PALETTE = (
    "#2563eb",
    "#dc2626",
    "#16a34a",
    "#9333ea",
    "#ea580c",
    "#0891b2",
    "#4b5563",
    "#ca8a04",
    "#db2777",
    "#0d9488",
)
#: Most task names (or workers) drawn in one chart: more lines are unreadable.
MAX_LINES = len(PALETTE)


#: Task counters a rate can be drawn of.
Event = Literal["received", "started", "succeeded", "failed", "retried", "deferred"]
#: Worker readings drawn over time (percent).
Reading = Literal["memory", "cpu"]


def _per_name(snap: TasksSnapshot, event: Event) -> dict[str, float]:
    """A snapshot's cumulative count of ``event`` per task name (summed over queues)."""
    out: dict[str, float] = {}
    for row in snap.tasks:
        out[row.name] = out.get(row.name, 0.0) + float(getattr(row, event))
    return out


def task_rates(
    snapshots: Sequence[TasksSnapshot], event: Event
) -> dict[str, list[tuple[float, float | None]]]:
    """Per task name: (time, ``event`` per second since the previous snapshot)."""
    ordered = sorted(snapshots, key=lambda s: s.at)
    out: dict[str, list[tuple[float, float | None]]] = {}
    for before, after in itertools.pairwise(ordered):
        dt = after.at - before.at
        if dt <= 0:
            continue
        old, new = _per_name(before, event), _per_name(after, event)
        for name, count in new.items():
            delta = count - old.get(name, 0.0)
            out.setdefault(name, []).append((after.at, max(delta, 0.0) / dt))
    return out


def busiest(
    rates: dict[str, list[tuple[float, float | None]]], limit: int = MAX_LINES
) -> list[str]:
    """Names with the most events over the window, most first."""
    return sorted(rates, key=lambda n: -sum(v or 0.0 for _, v in rates[n]))[:limit]


def task_rate_chart(
    title: str,
    snapshots: Sequence[TasksSnapshot],
    event: Event,
    *,
    start: float,
    end: float,
    names: Iterable[str] | None = None,
    empty: str = "no task ran in a stats snapshot of this window",
) -> TimeChart:
    """One line per task name of ``event`` per second."""
    rates = task_rates(snapshots, event)
    chosen = list(names) if names is not None else busiest(rates)
    lines = [
        Line(name, PALETTE[i % len(PALETTE)], rates.get(name, []))
        for i, name in enumerate(chosen[:MAX_LINES])
    ]
    return time_chart(title, lines, start=start, end=end, unit="/s", empty=empty)


def worker_lines(
    snapshots: Sequence[WorkersSnapshot], what: Reading, by_host: bool = False
) -> dict[str, list[tuple[float, float | None]]]:
    """Per live worker (or per host: the highest of its workers): (time, its ``what`` percent)."""
    out: dict[str, list[tuple[float, float | None]]] = {}
    for snap in snapshots:
        readings: dict[str, float] = {}
        for worker in snap.workers:
            value = worker.memory_pct if what == "memory" else worker.cpu_pct
            if not worker.alive or value is None:
                continue
            name = worker.hostname
            if by_host:
                name = worker.host or name.rpartition("@")[2]
            readings[name] = max(value, readings.get(name, value))
        for name, value in readings.items():
            out.setdefault(name, []).append((snap.at, value))
    return out


def worker_chart(
    title: str,
    snapshots: Sequence[WorkersSnapshot],
    what: Reading,
    *,
    start: float,
    end: float,
    by_host: bool = False,
    thresholds: Sequence[tuple[float, str]] = (),
) -> TimeChart:
    """One line per worker (or host) of a percent reading."""
    lines_by_name = worker_lines(snapshots, what, by_host)
    names = sorted(lines_by_name)[:MAX_LINES]
    lines = [
        Line(name, PALETTE[i % len(PALETTE)], lines_by_name[name]) for i, name in enumerate(names)
    ]
    return time_chart(
        title,
        lines,
        start=start,
        end=end,
        unit="%",
        thresholds=thresholds,
        empty="no worker reading in a stats snapshot of this window",
    )
