"""Time charts per task name and per worker, from the snapshots of the stats collection.

The ``tasks`` series holds each task name's cumulative counters per snapshot; a rate is the
difference between two consecutive snapshots over the time between them (a counter that went
down, after a Redis flush, restarts from zero rather than showing a negative rate). The
``workers`` series holds every worker's heartbeat reading per snapshot.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from taskyard.monitoring.dashboard.charts import Line, time_chart

#: Snapshots of a big series (``tasks``: every task name's counters) read for one chart: rates
#: between sampled snapshots are as true as between consecutive ones, at a fraction of the read.
SAMPLED_POINTS = 48

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


def sampled_series(
    store: Any, name: str, since: float, now: float, points: int = SAMPLED_POINTS
) -> list[dict[str, Any]]:
    """About ``points`` snapshots of series ``name`` spread over ``[since, now]``, newest first.

    Reads only the sampled entries of the Redis list (one pipelined round trip of LINDEX);
    ranges older than Redis keeps, and stores without a Redis list, go through
    ``store.series``. Callers must not change the snapshots (they are shared between builds).
    """
    client, keys = getattr(store, "redis", None), getattr(store, "keys", None)
    settings = getattr(store, "settings", None)
    if client is None or keys is None or settings is None:
        rows: list[dict[str, Any]] = store.series(name, since, None, points, 0)
        return rows
    key = keys.series(name)
    length = int(client.llen(key))
    interval = float(settings.monitoring.stats_interval_s)
    within = min(length, int((now - since) / interval) + 2)
    if within <= 0:
        rows = store.series(name, since, None, points, 0)
        return rows
    with client.pipeline(transaction=False) as pipe:
        for index in sample_indices(length, within, points):
            pipe.lindex(key, index)
        raws = pipe.execute()
    out = [_parse(raw) for raw in raws if raw]
    picked = [snap for snap in out if float(snap.get("at", 0)) >= since]
    if len(picked) == len(out) and length <= within and out:
        # Redis ends inside the window: older snapshots come from the history database.
        # (Straight from the database: store.series would parse the whole Redis list first.)
        from taskyard.monitoring import history

        engine = getattr(store, "engine", None)
        if engine is not None:
            until = float(out[-1]["at"]) - 1e-6
            # Rows in [since, until]: all rows up to until, less those before since.
            count = history.count_snapshots(engine, name, until) - history.count_snapshots(
                engine, name, since - 1e-6
            )
            stride = max(1, math.ceil(count / max(1, points // 2)))
            for offset in range(0, count, stride):
                picked.extend(history.read_snapshots(engine, name, since, until, 1, offset))
    return picked


def _num(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _per_name(snap: dict[str, Any], event: str) -> dict[str, float]:
    """A snapshot's cumulative count of ``event`` per task name (summed over queues)."""
    out: dict[str, float] = {}
    for row in snap.get("tasks") or []:
        name = str(row.get("name", "?"))
        out[name] = out.get(name, 0.0) + (_num(row.get(event)) or 0.0)
    return out


def task_rates(
    snapshots: Sequence[dict[str, Any]], event: str
) -> dict[str, list[tuple[float, float | None]]]:
    """Per task name: (time, ``event`` per second since the previous snapshot)."""
    ordered = sorted(
        (s for s in snapshots if _num(s.get("at")) is not None), key=lambda s: float(s["at"])
    )
    out: dict[str, list[tuple[float, float | None]]] = {}
    for before, after in itertools.pairwise(ordered):
        dt = float(after["at"]) - float(before["at"])
        if dt <= 0:
            continue
        old, new = _per_name(before, event), _per_name(after, event)
        for name, count in new.items():
            delta = count - old.get(name, 0.0)
            out.setdefault(name, []).append((float(after["at"]), max(delta, 0.0) / dt))
    return out


def busiest(
    rates: dict[str, list[tuple[float, float | None]]], limit: int = MAX_LINES
) -> list[str]:
    """Names with the most events over the window, most first."""
    return sorted(rates, key=lambda n: -sum(v or 0.0 for _, v in rates[n]))[:limit]


def task_rate_chart(
    title: str,
    snapshots: Sequence[dict[str, Any]],
    event: str,
    *,
    start: float,
    end: float,
    names: Iterable[str] | None = None,
    empty: str = "no task has run in this window",
) -> str:
    """One line per task name of ``event`` per second."""
    rates = task_rates(snapshots, event)
    chosen = list(names) if names is not None else busiest(rates)
    lines = [
        Line(name, PALETTE[i % len(PALETTE)], rates.get(name, []))
        for i, name in enumerate(chosen[:MAX_LINES])
    ]
    return time_chart(title, lines, start=start, end=end, unit="/s", empty=empty)


def worker_lines(
    snapshots: Sequence[dict[str, Any]], key: str, by_host: bool = False
) -> dict[str, list[tuple[float, float | None]]]:
    """Per worker (or per host: the highest of its workers): (time, reading of ``key``)."""
    out: dict[str, list[tuple[float, float | None]]] = {}
    for snap in snapshots:
        at = _num(snap.get("at"))
        if at is None:
            continue
        readings: dict[str, float] = {}
        for worker in snap.get("workers") or []:
            if not worker.get("alive", True):
                continue
            value = _num(worker.get(key))
            if value is None:
                continue
            name = str(worker.get("hostname", "?"))
            if by_host:
                name = str(worker.get("host") or name.rpartition("@")[2])
            readings[name] = max(value, readings.get(name, value))
        for name, value in readings.items():
            out.setdefault(name, []).append((at, value))
    return out


def worker_chart(
    title: str,
    snapshots: Sequence[dict[str, Any]],
    key: str,
    *,
    start: float,
    end: float,
    by_host: bool = False,
    thresholds: Sequence[tuple[float, str]] = (),
) -> str:
    """One line per worker (or host) of a percent reading."""
    lines_by_name = worker_lines(snapshots, key, by_host)
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
        empty="no worker heartbeats in this window",
    )
