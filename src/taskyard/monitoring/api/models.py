"""Response models of the stats API: they document the OpenAPI schema and name the fields that
``?fields=`` may select.

The rows come from :class:`taskyard.monitoring.store.StatsStore`; models allow extra keys so a
field the store adds later reaches clients before it is documented here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow")


class QueueStats(_Row):
    """One level's queue: true depth on the broker."""

    queue: str = Field(description="Queue (level) name: critical, high, normal, low or batch.")
    depth: int = Field(description="Messages waiting plus reserved and not yet acknowledged.")
    ready: int = Field(description="Messages waiting in the queue (all priority sub-lists).")
    reserved: int = Field(description="Messages delivered to a worker, not yet acknowledged.")
    reserved_known: bool = Field(
        True,
        description="False on RabbitMQ without the management plugin: reserved is 0 "
        "because the broker does not report it.",
    )
    scheduled: int | None = Field(
        None,
        description="Messages with a countdown or ETA waiting in the broker-side delayed "
        "set, not yet due (not part of depth); null on RabbitMQ, where a worker holds them.",
    )
    oldest_ready_age_s: float | None = Field(
        None,
        description="Seconds the oldest ready message has waited (from its sent time); "
        "null when the queue is empty, on RabbitMQ, or for messages sent without capture.",
    )


class WorkerStats(_Row):
    """A worker from its heartbeat (written by the resource guards)."""

    hostname: str
    alive: bool = Field(description="Heartbeat younger than its time to live.")
    age_s: float | None = Field(None, description="Seconds since the last heartbeat.")
    at: float | None = Field(None, description="Last heartbeat, seconds since the epoch.")
    queues: list[str] = Field([], description="Queues it consumes, in priority order.")
    paused_queues: list[str] = Field([], description="Queues paused by back-pressure.")
    memory_pct: float | None = Field(None, description="Memory use, percent of the limit.")
    cpu_pct: float | None = Field(None, description="CPU use, percent, averaged.")
    state: str | None = Field(None, description="Resource pressure: ok, warning or critical.")
    deferred: int | None = Field(None, description="Tasks it held back since it started.")
    deferred_by_reason: dict[str, int] = Field(
        {},
        description="Deferrals per reason: memory (the level's memory threshold), "
        "requires_memory (a task's requires_memory_mb).",
    )
    paused_reasons: dict[str, str] = Field(
        {}, description="Paused queue -> why: memory, cpu or cpu-critical."
    )
    host: str | None = Field(None, description="The machine it runs on (host-level alerts).")
    host_cpu_pct: float | None = Field(
        None,
        description="The whole host's (or cgroup's) CPU busy, percent, this worker "
        "included; cpu_pct leaves the worker's own processes out.",
    )
    pool_nice: int | None = Field(None, description="Nice value added to its pool processes.")


class TaskStats(_Row):
    """Counts and latency percentiles of one task name on one queue."""

    name: str
    queue: str
    received: int = 0
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    deferred: int = 0
    runtime_p50: float | None = Field(None, description="Runtime median, seconds.")
    runtime_p95: float | None = Field(None, description="Runtime 95th percentile, seconds.")
    runtime_p99: float | None = Field(None, description="Runtime 99th percentile, seconds.")
    wait_p50: float | None = Field(None, description="Queue wait (sent -> started) median, s.")
    wait_p95: float | None = Field(None, description="Queue wait 95th percentile, seconds.")
    wait_p99: float | None = Field(None, description="Queue wait 99th percentile, seconds.")


class BatchStats(_Row):
    """One batch name: items waiting, batches in flight and dead, counters (all groups)."""

    batch_name: str
    task: str | None = Field(None, description="Task that receives the batches.")
    level: str | None = Field(None, description="Queue the batches are published to.")
    batch_size: int | None = None
    max_wait_s: float | None = None
    buffered: int = Field(0, description="Items waiting in the Redis buffers.")
    oldest_age_s: float | None = Field(None, description="Age of the oldest waiting item, s.")
    in_flight: int = Field(0, description="Claimed batches not yet finished.")
    in_flight_items: int = 0
    dead: int = Field(0, description="Batches that exhausted their retries.")
    dead_items: int = 0
    processed: int = Field(0, description="Items processed successfully.")
    failed: int = Field(0, description="Items of failed batch runs.")
    groups: list[dict[str, Any]] = Field([], description="The same figures per group key.")


class CacheStats(_Row):
    """Hit and miss counters of one cache namespace."""

    namespace: str
    hits: int = 0
    misses: int = 0
    hit_rate_pct: float | None = Field(None, description="hits / (hits + misses), percent.")


class MaintenanceRun(_Row):
    """One index-maintenance run, as reported by the maintenance job."""

    started_at: float | None = Field(None, description="Seconds since the epoch.")
    finished_at: float | None = Field(None, description="Seconds since the epoch.")
    status: str | None = None


class Alert(_Row):
    """An alert with its state: firing since, resolved at."""

    id: str
    alertname: str
    severity: str = Field(description="warning or critical.")
    state: str = Field(description="firing or resolved.")
    since: float = Field(description="Firing since, seconds since the epoch.")
    active_since: float | None = Field(
        None,
        description="When the condition was first seen (it fires after the rule's for "
        "duration), seconds since the epoch.",
    )
    resolved_at: float | None = Field(None, description="Seconds since the epoch, when resolved.")
    value: float | None = None
    threshold: float | None = None
    labels: dict[str, str] = {}
    summary: str = ""


class AlertChange(_Row):
    """One alert state change: fired, changed severity, or resolved."""

    at: float = Field(description="When the change was recorded, seconds since the epoch.")
    id: str
    alertname: str
    state: str = Field(description="firing or resolved.")
    severity: str | None = None
    since: float | None = Field(None, description="Firing since, seconds since the epoch.")
    resolved_at: float | None = None
    value: float | None = None
    threshold: float | None = None
    labels: dict[str, str] = {}
    summary: str = ""


class Overview(_Row):
    """The whole platform at a glance."""

    at: float = Field(description="When it was computed, seconds since the epoch.")
    totals: dict[str, int] = Field(
        description="Counters over all tasks: received, started, succeeded, failed, retried, "
        "deferred."
    )
    queues: dict[str, int] = Field(description="Queue -> true depth.")
    queue_depth_total: int
    workers_alive: int
    workers_total: int
    alerts_firing: int
    alerts_critical: int
    deferred_by_reason: dict[str, int] = Field(
        {}, description="Deferrals per reason over the known workers: memory, requires_memory."
    )
    throughput_per_s: float = Field(description="Tasks finished per second (last collection).")
    succeeded_per_s: float
    failed_per_s: float
    latency: dict[str, float | None] = Field(
        description="runtime_p50/p95/p99 and wait_p50/p95/p99 over all tasks, seconds."
    )


class HistoryPage(BaseModel):
    """One page of a stats time series, newest first."""

    series: str
    since: float | None = Field(description="Lower time bound used, seconds since the epoch.")
    until: float | None = Field(description="Upper time bound used, seconds since the epoch.")
    limit: int
    offset: int
    items: list[dict[str, Any]]
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")


class Health(BaseModel):
    """Liveness or readiness, with each dependency's state."""

    status: str = Field(description="live, ready or unavailable.")
    checks: dict[str, str] = Field(
        {}, description="Dependency -> 'ok' or the reason it failed (redis, database, broker)."
    )


class ErrorBody(BaseModel):
    """Every error response: a short code and a readable detail."""

    error: str
    detail: Any


class AdminResult(BaseModel):
    """What an admin action did."""

    action: str
    detail: dict[str, Any] = {}


class AuditEntry(BaseModel):
    """One operator action of the audit trail."""

    id: str = Field(description="Stream entry id (orders entries).")
    at: float = Field(description="When, s since epoch.")
    actor: str = Field(description="User name, 'admin-token', or 'cli:<login>'.")
    role: str
    action: str = Field(description="e.g. dead.replay, dead.purge, user.add, session.login.")
    target: str = Field(description="What it acted on: ids, a filter, a name.")
    count: int = Field(description="How many it touched.")
    via: str = Field(description="api, dashboard or cli.")
    detail: dict[str, Any] = {}


# The pydantic mypy plugin gives the generated __init__ a "kwargs" parameter (the alias) beside
# its own **kwargs (extra fields allowed); the model itself is fine.
class DeadLetterEntry(_Row):  # type: ignore[no-redef]
    """One dead letter: a task (or a message that is not one) that will not run again alone."""

    id: str = Field(description="The task id (or a generated id for a message that is not one).")
    reason: str = Field(description="failed, crashed, poison, undecodable, expired, ...")
    name: str = ""
    queue: str = ""
    state: str = Field("dead", description="dead or replayed.")
    args: str = Field("[]", description="Positional arguments, as JSON.")
    # Named apart from "kwargs" (its JSON name): a field may not shadow BaseModel's **kwargs.
    kwargs_json: str = Field(
        "{}",
        validation_alias="kwargs",
        serialization_alias="kwargs",
        description="Keyword arguments, as JSON.",
    )
    replayable: bool = True
    exception_type: str = ""
    exception: str = ""
    traceback: str = ""
    deliveries: int = 1
    attempts: int = 1
    worker: str = ""
    first_at: float = Field(0.0, description="First death (s since epoch).")
    last_at: float = Field(0.0, description="Latest death (s since epoch).")
    times: int = 1
    detail: str = ""
    replay_of: str = ""
    replayed_as: str = ""
    replayed_at: float = 0.0


class DeadLetterPage(_Row):
    """A page of dead letters, newest first, with the dead batches beside them."""

    total: int = Field(description="Dead letters matching the filters.")
    limit: int
    offset: int
    entries: list[DeadLetterEntry]
    batches: list[dict[str, Any]] = Field(
        default_factory=list, description="Dead batches (unfiltered pages only)."
    )


class TimelineEvent(_Row):
    """One step of a task: sent, received, started, retried, deferred, succeeded, failed, dead."""

    at: float = Field(description="When (s since epoch).")
    event: str
    name: str | None = None
    queue: str | None = None
    worker: str | None = None
    detail: str | None = None


class TaskTimeline(_Row):
    """A task's timeline from the task lookup, and its dead letter when it died."""

    task_id: str
    name: str | None = None
    queue: str | None = None
    state: str | None = Field(None, description="The latest step (dead when it died).")
    first_at: float | None = None
    last_at: float | None = None
    started_at: float | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    events: list[TimelineEvent] = Field(default_factory=list)
    dead: DeadLetterEntry | None = None
    cancel: dict[str, Any] | None = Field(
        None,
        description="The cancel record: at, by, terminate, grace_s and, once it took effect, "
        "outcome (dropped, skipped, stopped, terminated, superseded) and outcome_at.",
    )
    progress: dict[str, Any] | None = Field(
        None, description="The last progress report: done, total, detail, at (s since epoch)."
    )


class CancelRequest(BaseModel):
    """Which tasks to cancel: ids, or a filter (name glob, queue, older than s)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(default_factory=list, max_length=100_000)
    name: str | None = Field(None, max_length=300)
    queue: str | None = Field(None, max_length=300)
    older_than_s: float | None = Field(None, ge=0)
    terminate: bool = False
    grace_s: float | None = Field(None, ge=0)
    dry_run: bool = False


#: Field names each list endpoint's ``?fields=`` accepts.
def field_names(model: type[BaseModel]) -> tuple[str, ...]:
    """Declared field names of ``model``, in declaration order."""
    return tuple(model.model_fields)
