"""Typed rows from the stats store to the pages: the JSON API's models for live readings, typed
snapshots for the series, and the thresholds the charts draw.

The store answers the JSON API's shapes (``dict`` rows); each page validates them into the
models of :mod:`taskyard.monitoring.api.models` once, here, so templates read typed fields and
one name per field (``in_flight_items``, as the API names it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from taskyard.config import Settings

Row = TypeVar("Row", bound=BaseModel)

#: Colours of the warning and critical threshold lines.
WARNING, CRITICAL = "#d97706", "#dc2626"


def typed(model: type[Row], rows: Sequence[dict[str, Any]]) -> list[Row]:
    """The store's rows as ``model`` (the JSON API's model of that row)."""
    return [model.model_validate(row) for row in rows]


@dataclass(frozen=True)
class Thresholds:
    """The alert thresholds the charts draw as marker lines (percent)."""

    memory_warning_pct: float = 80.0
    memory_critical_pct: float = 90.0
    cpu_warning_pct: float = 80.0
    cpu_critical_pct: float = 90.0
    cache_hit_rate_pct: float = 50.0

    @classmethod
    def of(cls, settings: Settings) -> Thresholds:
        mon = settings.monitoring
        return cls(
            memory_warning_pct=mon.alert_memory_warning_pct,
            memory_critical_pct=mon.alert_memory_critical_pct,
            cpu_warning_pct=mon.alert_cpu_warning_pct,
            cpu_critical_pct=mon.alert_cpu_critical_pct,
            cache_hit_rate_pct=mon.alert_cache_hit_rate_pct,
        )

    def markers(self, what: str) -> list[tuple[float, str]]:
        """The warning and critical lines of ``memory`` or ``cpu``."""
        if what == "memory":
            return [(self.memory_warning_pct, WARNING), (self.memory_critical_pct, CRITICAL)]
        return [(self.cpu_warning_pct, WARNING), (self.cpu_critical_pct, CRITICAL)]


# --- snapshots of the series (written by the stats collection, newest first) -------------------
# A snapshot keeps the shape of its day: fields added later default, so older history still draws.


class Snapshot(BaseModel):
    """One snapshot of a series: ``at`` (s since epoch) and what its charts read (other fields
    are ignored). Shared between page builds (see :func:`snapshots`): never changed once made.
    Defaults are immutable: pydantic copies a mutable one for every row that lacks it."""

    model_config = ConfigDict(frozen=True)

    at: float


class LevelDepth(BaseModel):
    model_config = ConfigDict(frozen=True)

    depth: int = 0
    ready: int = 0
    reserved: int = 0


class QueuesSnapshot(Snapshot):
    #: Level -> its depths (the oldest snapshots held the depth alone).
    queues: Mapping[str, LevelDepth | int] = MappingProxyType({})

    def depth(self, level: str) -> float | None:
        entry = self.queues.get(level)
        if entry is None:
            return None
        return float(entry.depth if isinstance(entry, LevelDepth) else entry)


class WindowTask(BaseModel):
    """A task name's runs in one collection window: how many, and their run-time percentiles."""

    model_config = ConfigDict(frozen=True)

    name: str
    queue: str = ""
    finished: int = 0
    runtime_p50: float | None = None
    runtime_p95: float | None = None
    runtime_p99: float | None = None


class ThroughputSnapshot(Snapshot):
    per_s: float | None = None
    succeeded_per_s: float | None = None
    failed_per_s: float | None = None
    received_per_s: float | None = None
    tasks: tuple[WindowTask, ...] = ()


class LatencySnapshot(Snapshot):
    runtime_p50: float | None = None
    runtime_p95: float | None = None
    runtime_p99: float | None = None
    wait_p50: float | None = None
    wait_p95: float | None = None
    wait_p99: float | None = None


class TaskCounts(BaseModel):
    """What a time chart reads of a task row in a snapshot (the rest is ignored: validating
    every field of every row of a window costs more than the page)."""

    model_config = ConfigDict(frozen=True)

    name: str
    queue: str = ""
    received: int = 0
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    deferred: int = 0
    runtime_p50: float | None = None
    runtime_p95: float | None = None
    runtime_p99: float | None = None


class WorkerReading(BaseModel):
    """What a time chart reads of a worker's heartbeat in a snapshot."""

    model_config = ConfigDict(frozen=True)

    hostname: str
    host: str | None = None
    alive: bool = True
    memory_pct: float | None = None
    cpu_pct: float | None = None


class BatchReading(BaseModel):
    """What a time chart reads of a batch name in a snapshot."""

    model_config = ConfigDict(frozen=True)

    batch_name: str
    buffered: int = 0


class TasksSnapshot(Snapshot):
    tasks: tuple[TaskCounts, ...] = ()


class WorkersSnapshot(Snapshot):
    workers: tuple[WorkerReading, ...] = ()


class BatchesSnapshot(Snapshot):
    batches: tuple[BatchReading, ...] = ()


@dataclass
class Series:
    """The snapshots the overview draws, per series, newest first."""

    queues: list[QueuesSnapshot] = field(default_factory=list)
    throughput: list[ThroughputSnapshot] = field(default_factory=list)
    latency: list[LatencySnapshot] = field(default_factory=list)
    tasks: list[TasksSnapshot] = field(default_factory=list)
    workers: list[WorkersSnapshot] = field(default_factory=list)
    batches: list[BatchesSnapshot] = field(default_factory=list)

    def all(self) -> list[Sequence[Snapshot]]:
        return [self.queues, self.throughput, self.latency, self.tasks, self.workers, self.batches]


S = TypeVar("S", bound=Snapshot)

#: Typed snapshots by the identity of the store's dict they were made from. The store hands out
#: the same parsed dict for a snapshot on every read (``StatsStore.sample_series`` keeps them),
#: so a page build validates only the snapshots it has not seen: validating a whole window of
#: every task name's counters costs several times the rest of the page. Each entry holds its
#: dict, so the id cannot be reused while the entry lives; bounded, the oldest entries go first.
_TYPED: dict[int, tuple[dict[str, Any], Snapshot]] = {}
_TYPED_MAX = 8192


def snapshots(model: type[S], rows: Sequence[dict[str, Any]]) -> list[S]:
    """The store's snapshots of one series as ``model``, each validated once."""
    out: list[S] = []
    for row in rows:
        entry = _TYPED.get(id(row))
        if entry is not None and entry[0] is row and type(entry[1]) is model:
            out.append(entry[1])
            continue
        snap = model.model_validate(row)
        if len(_TYPED) >= _TYPED_MAX:
            for old in list(_TYPED)[: _TYPED_MAX // 4]:
                del _TYPED[old]
        _TYPED[id(row)] = (row, snap)
        out.append(snap)
    return out


def series_of(raw: dict[str, list[dict[str, Any]]]) -> Series:
    """The store's snapshots (by series name) as typed snapshots."""
    return Series(
        queues=snapshots(QueuesSnapshot, raw.get("queues", [])),
        throughput=snapshots(ThroughputSnapshot, raw.get("throughput", [])),
        latency=snapshots(LatencySnapshot, raw.get("latency", [])),
        tasks=snapshots(TasksSnapshot, raw.get("tasks", [])),
        workers=snapshots(WorkersSnapshot, raw.get("workers", [])),
        batches=snapshots(BatchesSnapshot, raw.get("batches", [])),
    )
