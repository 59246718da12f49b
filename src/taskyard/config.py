"""Settings: the only place in taskyard that reads the environment.

Every field reads ``TASKYARD_<FIELD>``; fields of a section read ``TASKYARD_<SECTION>__<FIELD>``
(for example ``TASKYARD_GUARD__MEMORY_WARNING_PCT=75``). Lists and mappings are given as JSON.
Time is in seconds, memory in megabytes, ratios in percent, as the field names say.

Importing this module does no I/O; :func:`load_settings` reads the environment when called and
turns any malformed value into a :class:`~taskyard.errors.ConfigurationError` that names the
variable and what it expected. Settings are strict: an unknown ``TASKYARD_*`` variable (other than
the ``TASKYARD_TEST_*``/``TASKYARD_BENCH_*`` ones of the test suite and benchmarks, and
``TASKYARD_BIND`` of docker compose), an unknown field of a section, a URL whose scheme does not
fit its role, and a NaN or infinite number are refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from taskyard.errors import ConfigurationError, did_you_mean
from taskyard.seams import Seam

# Celery internals read by result_backend_schemes (checked by tests/test_seams.py).
SEAMS = (
    Seam("celery.app.backends", "BACKEND_ALIASES", "attribute"),
    Seam("celery.app.backends", "by_url", params=("backend", "loader")),
    Seam("celery.utils.imports", "load_extension_class_names", params=("namespace",)),
)

ENV_PREFIX = "TASKYARD_"
NESTED_DELIMITER = "__"

#: Redis the platform falls back to when nothing is configured: the local server, database 0.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

#: URL schemes per role, the one place they are listed. Redis for buffers, cache and stats is
#: reached through redis-py (redis, rediss, unix; kombu's redis+socket is rewritten to unix).
#: Sentinel is the broker's only (SENTINEL_REDIS_URL says why).
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+socket"})
#: The broker is a kombu transport: Redis (a socket is redis+socket, Sentinel is sentinel) or
#: RabbitMQ.
REDIS_BROKER_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "sentinel"})
BROKER_SCHEMES = REDIS_BROKER_SCHEMES | {"amqp", "amqps", "pyamqp"}

#: TASKYARD_* variables that are not settings: the test suite's and benchmarks' own, and the
#: bind address docker compose substitutes into its port mappings.
NOT_SETTINGS_PREFIXES = ("TASKYARD_TEST_", "TASKYARD_BENCH_")
NOT_SETTINGS = frozenset({"TASKYARD_BIND"})

#: A period of a beat job (s): positive and at least one second, as beat cannot usefully tick
#: faster.
BeatInterval = Annotated[float, Field(ge=1.0)]


def url_scheme(url: str) -> str:
    """The scheme of ``url`` in lower case ("" when it has none)."""
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else ""


def is_redis_url(url: str) -> bool:
    """Whether a broker URL is Redis (which gets Redis transport options)."""
    return url_scheme(url) in REDIS_BROKER_SCHEMES


def redis_client_url(url: str) -> str:
    """``url`` as redis-py's ``from_url`` takes it (kombu's ``redis+socket://`` as ``unix://``)."""
    if url_scheme(url) == "redis+socket":
        return "unix://" + url.split("://", 1)[1]
    return url


def redis_broker_url(url: str) -> str:
    """A Redis URL as kombu takes it as a broker (redis-py's ``unix://`` as ``redis+socket://``)."""
    if url_scheme(url) == "unix":
        return "redis+socket://" + url.split("://", 1)[1]
    return url


#: Why TASKYARD_REDIS_URL takes no sentinel:// URL, though the broker does.
SENTINEL_REDIS_URL = (
    "Sentinel is supported for the broker only: taskyard's own Redis client (batch buffers, "
    "cache, live stats, heartbeats, dead letters, timelines) is redis-py's Redis.from_url, "
    "which takes redis://, rediss:// and unix:// URLs, and a Sentinel client needs a master "
    "name that no setting gives; the broker, which defaults to this URL, would need one too. "
    "Give the master's redis:// URL here and the sentinel:// URL as TASKYARD_BROKER_URL"
)


def _check_redis_url(url: str) -> str:
    if url_scheme(url) == "sentinel":
        raise ValueError(f"Redis URL {url!r} is a Sentinel URL. {SENTINEL_REDIS_URL}")
    return _check_scheme(url, REDIS_SCHEMES, "Redis URL")


def _check_scheme(url: str, schemes: frozenset[str], role: str) -> str:
    scheme = url_scheme(url)
    if scheme not in schemes:
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise ValueError(
            f"{role} {url!r} has {shown}; expected one of "
            f"{', '.join(s + '://' for s in sorted(schemes))}"
        )
    return url


#: Result backend URLs whose backend is SQLAlchemy: ``db+<SQLAlchemy URL>``.
DATABASE_BACKENDS = frozenset({"db", "database"})


def result_backend_schemes() -> frozenset[str]:
    """The backend names Celery resolves a result backend URL's scheme to: its own aliases
    (``celery.app.backends.BACKEND_ALIASES``) and those installed packages register under the
    ``celery.result_backends`` entry points, as ``celery.app.backends.by_name`` reads them."""
    # Celery internals: by_url takes the scheme (the part before "+" when there is one) as the
    # backend name, and by_name looks it up in these two places.
    from celery.app.backends import BACKEND_ALIASES
    from celery.utils.imports import load_extension_class_names

    extensions = load_extension_class_names("celery.result_backends")
    return frozenset(BACKEND_ALIASES) | {str(name) for name, _ in extensions}


def _check_result_backend(url: str) -> str:
    scheme = url_scheme(url)
    name, plus, _ = scheme.partition("+")
    if "." in name or ":" in name:
        return url  # a backend class by its import path (package.module:Class://...)
    known = result_backend_schemes()
    if name not in known or (name in DATABASE_BACKENDS and not plus):
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        plain = ", ".join(s + "://" for s in sorted(known - DATABASE_BACKENDS))
        raise ValueError(
            f"result backend {url!r} has {shown}; expected a Celery result backend URL: "
            f"db+<SQLAlchemy URL> (db+postgresql://..., db+sqlite:///results.db) or one of "
            f"{plain} (also as NAME+...://, e.g. redis+socket://, cache+memcached://)"
            + did_you_mean(name, known)
        )
    if name in DATABASE_BACKENDS:
        try:
            _check_database_url(url.split("+", 1)[1])
        except ValueError as exc:
            raise ValueError(f"result backend {url!r}: {exc}") from None
    return url


def _check_database_url(url: str) -> str:
    # Imported here: SQLAlchemy is only needed once settings are read, not to import config.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ValueError(
            f"database URL {url!r} is not a SQLAlchemy URL of an installed "
            f"dialect (sqlite:///file.db, postgresql+psycopg2://...): {exc}"
        ) from None
    return url


class Section(BaseModel):
    """Base of the settings sections: unknown fields and NaN/infinite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RoutingRule(Section):
    """One routing rule: task names matching ``pattern`` go to ``level``.

    ``kind="glob"`` matches with shell wildcards (``bdc.tasks.report_*``); ``kind="regex"`` with a
    regular expression that must match the whole task name.
    """

    pattern: str
    level: str
    kind: Literal["glob", "regex"] = "glob"


class BatchSettings(Section):
    """Redis batch buffers behind ``@batch_task``."""

    # Items one batch name may hold before .delay() raises BatchBufferFull: bounds Redis memory
    # (100,000 items of 1 KB is about 100 MB).
    max_buffered: int = Field(100_000, ge=1)
    # Largest encoded item, bytes. Items are meant to be small; big payloads belong in storage.
    max_item_bytes: int = Field(64 * 1024, ge=16)
    # A claimed batch whose lease runs out is republished by the reaper (s). The worker running
    # a batch renews the lease every lease_s/3, so this bounds how long a crashed worker's batch
    # waits, not how long a batch may run; an unstarted batch also waits this long in a queue
    # before a (harmless, deduplicated) second message is published.
    lease_s: float = Field(60.0, gt=0)
    # How often the flusher/reaper scans for aged buffers and expired leases (s). Bounds how late
    # an age flush can be beyond max_wait.
    reaper_interval_s: float = Field(0.5, gt=0)
    # Run the flusher thread in every worker's main process (the age flush needs no producer).
    worker_flusher: bool = True
    # Retries of a failing batch before it goes to the dead-letter store.
    max_retries: int = Field(3, ge=0)
    # First retry delay (s); doubles on each further retry.
    retry_backoff_s: float = Field(1.0, ge=0)


class GuardSettings(Section):
    """Resource guards: admission of tasks by memory and CPU, consumer back-pressure."""

    # Admission, deferral and back-pressure on or off. Heartbeats and accounting run either way.
    enabled: bool = True
    # Where memory and CPU are read: "auto" uses the cgroup v2 limit/quota when one binds this
    # process, else the host; "cgroup" or "host" force one (auto falls back to host anyway).
    memory_source: Literal["auto", "cgroup", "host"] = "auto"
    # CPU pressure leaves out this worker's own processes: a worker never holds work back because
    # it is busy with work (its concurrency bounds that); it yields to everything else's load.
    cpu_exclude_own: bool = True
    # Sampler period (s): readings are at most this old when a task is admitted.
    sample_interval_s: float = Field(0.5, gt=0)
    # CPU is averaged over this window (s) so a single busy instant does not defer work.
    cpu_window_s: float = Field(5.0, gt=0)
    # Thresholds (percent of the limit: the cgroup's when there is one, else the host's); a
    # reading strictly above a threshold counts, so 100 switches that threshold off.
    memory_warning_pct: float = Field(80.0, gt=0, le=100)
    memory_critical_pct: float = Field(90.0, gt=0, le=100)
    cpu_warning_pct: float = Field(80.0, gt=0, le=100)
    cpu_critical_pct: float = Field(90.0, gt=0, le=100)
    # Paused queues resume once memory drops below this (hysteresis, percent).
    resume_pct: float = Field(70.0, gt=0, le=100)
    # ... and CPU below this (percent); separate so CPU can be switched off with 100/99.
    cpu_resume_pct: float = Field(70.0, gt=0, le=100)
    # Levels whose consumers are paused above the memory warning threshold (critical never is).
    pausable_levels: list[str] = ["low", "batch"]
    # Per level: when its tasks are deferred (re-published) for memory: "never", "warning" or
    # "memory_warning" (memory above its warning threshold), "critical" or "memory_critical"
    # (above its critical threshold). CPU never defers: see the cpu_* pause settings below.
    level_policy: dict[
        str, Literal["never", "warning", "critical", "memory_warning", "memory_critical"]
    ] = {
        "critical": "never",
        "high": "memory_critical",
        "normal": "warning",
        "low": "warning",
        "batch": "warning",
    }
    # A task held back for memory is re-published with a countdown that backs off: the n-th
    # deferral waits (defer_countdown_s + U(0, defer_jitter_s)) * 2^(n-1) (s), at most
    # defer_max_countdown_s. With leased reservations off (reservation_lease_s = 0),
    # defer_countdown_s + defer_jitter_s must stay below half the visibility timeout, or the
    # broker would redeliver the held message; with leases on it is renewed and never is.
    defer_countdown_s: float = Field(2.0, gt=0, le=300)
    defer_jitter_s: float = Field(1.0, ge=0, le=300)
    # A task deferred for longer than this runs anyway, logged as "overdue" (s).
    max_defer_age_s: float = Field(600.0, gt=0)
    # Worker heartbeat period (s); the Redis record lives for the period plus the slack (s).
    heartbeat_interval_s: float = Field(5.0, gt=0)
    heartbeat_slack_s: float = Field(5.0, gt=0)
    # Per-task RSS growth and CPU time, aggregated per task name in Redis.
    accounting: bool = True
    # A pool process writes its aggregates at most this often (s): one Redis call per period.
    accounting_flush_interval_s: float = Field(1.0, gt=0)
    # CPU pressure is handled by scheduling, not by re-publishing: above cpu_warning_pct these
    # levels' consumers are paused (until CPU drops below cpu_resume_pct) ...
    cpu_pause_levels: list[str] = ["low", "batch"]
    # ... and above cpu_critical_pct these as well (until below cpu_critical_resume_pct, %).
    # Critical and high are never paused for CPU, whatever these lists say.
    cpu_critical_pause_levels: list[str] = ["normal"]
    cpu_critical_resume_pct: float = Field(85.0, gt=0, le=100)
    # A queue paused for CPU is consumed again for cpu_release_s after being paused this long
    # (s): CPU pressure from a neighbour that never stops must slow held levels, not starve them
    # (a paused worker uses no CPU, so "everyone else's CPU" would never drop below resume).
    cpu_max_hold_s: float = Field(3.0, gt=0)
    cpu_release_s: float = Field(3.0, gt=0)
    # OS nice value added to the pool processes of workers that consume only nice_levels, so the
    # kernel gives low and batch work the CPU that nobody else wants (0 switches it off; 10 is
    # about a tenth of a nice-0 process's share under CFS).
    pool_nice: int = Field(10, ge=0, le=19)
    nice_levels: list[str] = ["low", "batch"]
    # The longest countdown of a memory deferral (s), see defer_countdown_s. With leases off an
    # explicit value must stay below half the visibility timeout; the default follows a short
    # visibility timeout down (to 0.9 of the half) instead.
    defer_max_countdown_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> GuardSettings:
        if self.memory_warning_pct > self.memory_critical_pct:
            raise ValueError("memory_warning_pct must not exceed memory_critical_pct")
        if self.cpu_warning_pct > self.cpu_critical_pct:
            raise ValueError("cpu_warning_pct must not exceed cpu_critical_pct")
        if self.resume_pct >= self.memory_warning_pct:
            raise ValueError("resume_pct must be below memory_warning_pct (hysteresis)")
        if self.cpu_resume_pct >= self.cpu_warning_pct:
            raise ValueError("cpu_resume_pct must be below cpu_warning_pct (hysteresis)")
        if self.cpu_critical_resume_pct >= self.cpu_critical_pct and self.cpu_critical_pct < 100:
            raise ValueError("cpu_critical_resume_pct must be below cpu_critical_pct (hysteresis)")
        return self


class CacheSettings(Section):
    """Redis cache-aside with tag invalidation and warmers."""

    # Time to live per resource type (s): user data 15 min to 1 h, beneficiary data 5 to 15 min,
    # system settings 1 h, analytics 15 min to 1 h (the service this platform serves).
    ttl_s: dict[str, float] = {
        "default": 900.0,
        "user": 1800.0,
        "beneficiary": 600.0,
        "settings": 3600.0,
        "analytics": 1800.0,
    }
    # How long a reader waits for another process recomputing the same key (s).
    stampede_wait_s: float = Field(5.0, gt=0)
    # An expired entry stays in Redis this much longer (s) so readers can be served it while
    # one process recomputes it, instead of all waiting.
    stale_grace_s: float = Field(60.0, ge=0)
    # Period of the cache-warming job (s).
    warm_interval_s: float = Field(300.0, gt=0)


class MaintenanceSettings(Section):
    """Index maintenance of the application database."""

    # "module:attribute" of the SQLAlchemy MetaData whose declared indexes are maintained. Empty:
    # nothing is maintained (each run is recorded as skipped); the application names its own
    # (the example service: "examples.bdc.models:Base.metadata").
    metadata: str = ""
    # Period of the maintenance job (s): daily.
    interval_s: float = Field(86_400.0, gt=0)
    # lock_timeout for DDL (s) and how many times a timed-out statement is retried.
    lock_timeout_s: float = Field(5.0, gt=0)
    lock_retries: int = Field(3, ge=0)
    # Estimated bloat above which REINDEX CONCURRENTLY runs when reindex is enabled (percent).
    reindex_bloat_pct: float = Field(30.0, gt=0)
    reindex: bool = False
    # Indexes smaller than this are never reindexed for bloat (MB): rebuilding them gains nothing
    # and their bloat estimate is noise.
    reindex_min_mb: float = Field(1.0, ge=0)
    # statement_timeout of maintenance statements (s): a build that runs longer is cancelled and
    # the run recorded as failed rather than holding a connection indefinitely.
    statement_timeout_s: float = Field(3600.0, gt=0)
    # Statements slower than this are counted per task (s).
    slow_statement_s: float = Field(0.5, gt=0)
    # Engine pool of the service this platform serves.
    pool_size: int = Field(20, ge=1)
    max_overflow: int = Field(30, ge=0)
    pool_timeout_s: float = Field(30.0, gt=0)
    pool_recycle_s: float = Field(3600.0, gt=0)


class ScheduleSettings(Section):
    """The beat schedule of the platform's periodic jobs (intervals default to each section's)."""

    # Task names left out of the beat schedule, e.g. ["taskyard.maintenance.run"] where another
    # system maintains the database.
    disabled: list[str] = []
    # Interval overrides per task name (s), e.g. {"taskyard.cache.warm": 60}; at least 1 s, as
    # beat cannot usefully tick faster. Names are checked against the platform's jobs when the
    # app is created (taskyard.beat).
    intervals_s: dict[str, BeatInterval] = {}
    # Run the cache warmers once when the workers start (once cluster-wide, not once per worker).
    warm_on_start: bool = True


class MonitoringSettings(Section):
    """Metric capture, stats collection, alerts, the stats API, Flower."""

    # Period of the stats collection job (s).
    stats_interval_s: float = Field(10.0, gt=0)
    # Worker-side metric buffers are written to Redis at most this often (s).
    flush_interval_s: float = Field(1.0, gt=0)
    # Snapshots kept in Redis per series, and days of history kept in the history database.
    series_length: int = Field(720, ge=10)
    history_retention_days: float = Field(30.0, gt=0)
    # Stats API bind address and admin bearer token (admin POSTs are refused when unset).
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_token: str | None = None
    # Browser sessions of the dashboard's users last this long after login (s): a working day.
    session_ttl_s: float = Field(12 * 3600.0, gt=0)
    # Once any user exists, /metrics still answers without credentials (Prometheus scrapes
    # rarely carry them); false: /metrics needs a user too.
    metrics_public: bool = True
    # Operator actions kept in the audit trail (entries, about: XADD MAXLEN ~).
    audit_max_entries: int = Field(100_000, ge=100)
    # Stats API responses (overview, lists, /metrics) are reused for this long (s): a burst of
    # requests or scrapes costs one store read. 0 reads the store on every request.
    api_cache_s: float = Field(1.0, ge=0, le=60)
    # Flower bind address and basic-auth credentials ("user:password").
    flower_port: int = Field(5555, ge=1, le=65535)
    # Flower bind address: loopback by default; "0.0.0.0" in a container so its port publishes.
    flower_host: str = "127.0.0.1"
    # Flower basic auth, "user:password[,user:password]". No built-in password: unset, `taskyard
    # flower` / `taskyard up` generate one at start, print it once and write it to the stack
    # file, so Flower never runs open or with a well-known password.
    flower_basic_auth: str | None = None
    # Flower's address as a browser reaches it, for the dashboard's links to Flower's task and
    # worker pages. None: http://<flower_host>:<flower_port> (loopback when bound to 0.0.0.0).
    flower_url: str | None = None
    # Alert thresholds (defaults of the service this platform serves).
    alert_memory_warning_pct: float = 80.0
    alert_memory_critical_pct: float = 90.0
    alert_cpu_warning_pct: float = 80.0
    alert_cpu_critical_pct: float = 90.0
    alert_slow_queries: int = 10
    alert_cache_hit_rate_pct: float = 50.0
    alert_slow_task_rate_pct: float = 10.0
    alert_queue_depth: int = 1000
    # The broker's or buffers' Redis above this share of its maxmemory (%): under noeviction it
    # refuses every write at 100 %, and an evicting policy starts dropping keys.
    alert_redis_memory_pct: float = Field(90.0, gt=0, le=100)
    # Prometheus semantics: a condition must hold for_s before its alert fires (pending until
    # then) and be gone resolve_s before it resolves (s), so one noisy reading neither fires nor
    # resolves an alert. Per rule in alert_timing, over alert_for_s/alert_resolve_s. The rules on
    # instantaneous readings wait to fire (CPU on a shared host is bursty: 2 min; memory and
    # queue depth 30 s). The windowed rules (slow queries, slow task rate, cache hit rate)
    # already aggregate a whole collection window, so they fire at once, but one clean window
    # says little: they resolve after 60 s (measured: SlowTaskRate changed state 9 times in 90 s
    # of the demo beside a CPU hog with no resolve delay). A worker whose heartbeat is back is
    # back: WorkerHeartbeatMissing fires after the heartbeat's TTL and resolves at once.
    alert_for_s: float = Field(0.0, ge=0)
    alert_resolve_s: float = Field(60.0, ge=0)
    alert_timing: dict[str, dict[str, float]] = {
        "HostCpuHigh": {"for_s": 120.0, "resolve_s": 120.0},
        "HostMemoryHigh": {"for_s": 30.0, "resolve_s": 60.0},
        "QueueDepthHigh": {"for_s": 30.0, "resolve_s": 60.0},
        "WorkerHeartbeatMissing": {"for_s": 0.0, "resolve_s": 0.0},
    }
    # Alert state changes kept in the Redis history list (entries): the dashboard's recent past.
    alert_history_length: int = Field(500, ge=10)
    # Capture of per-task metrics in workers; off only to measure its overhead or to debug.
    capture_enabled: bool = True
    # Raw snapshots stay in the history database this long (s); older ones are rolled up to the
    # last snapshot of each history_rollup_s window, so a month of history stays small.
    history_raw_keep_s: float = Field(86_400.0, gt=0)
    history_rollup_s: float = Field(300.0, gt=0)
    # A task running longer than this counts as slow for the slow-task-rate alert (s).
    slow_task_s: float = Field(1.0, gt=0)
    # A worker whose heartbeat stopped stays listed (and alerted on as missing) this long, then
    # it is forgotten (s): long enough for an operator to notice, short enough that scaled-down
    # workers do not alert forever.
    worker_forget_after_s: float = Field(3600.0, gt=0)


class DeadLetterSettings(Section):
    """The dead-letter store, poison quarantine and task timelines (taskyard.deadletters)."""

    # Entries kept at most; the oldest go first: bounds Redis memory (10,000 entries of a few
    # KB each is tens of MB).
    max_entries: int = Field(10_000, ge=1)
    # Entries older than this are dropped (s): a week, long enough to notice and replay.
    retention_s: float = Field(7 * 86_400.0, gt=0)
    # Largest args/kwargs text and raw poison body kept per entry (bytes): a huge payload must
    # not fill Redis; the head is enough to identify it.
    max_payload_bytes: int = Field(16 * 1024, ge=256)
    # Largest traceback kept per entry (characters).
    max_traceback_chars: int = Field(8_000, ge=256)
    # Terminal failures (after the task's retries) and expired tasks are recorded; off, only
    # crashed and poison messages are (those would otherwise be lost).
    record_failures: bool = True
    record_expired: bool = True
    # Delivery counts of redelivered messages live this long after their last redelivery (s):
    # far longer than the visibility timeout, so every redelivery of one message counts.
    delivery_count_ttl_s: float = Field(86_400.0, gt=0)
    # Task timelines (sent, received, started, ... dead) kept in the history database (s).
    timeline_retention_s: float = Field(7 * 86_400.0, gt=0)
    # Timeline events waiting in Redis for the stats collection to move them to the database;
    # beyond this the oldest are dropped (events are best-effort, like Celery's).
    timeline_max_pending: int = Field(200_000, ge=100)
    # Every worker ingests the messages the transport set aside (they become poison entries) and
    # applies the bounds above this often (s); one worker per interval does it (a Redis lock).
    # No beat or stats job needed.
    upkeep_interval_s: float = Field(30.0, gt=0)


class JobSettings(Section):
    """Job control: unique locks, durable cancellation, progress, bulk enqueue
    (taskyard.broker.control.jobs)."""

    # Longest a unique lock ("queued"/"active") lasts while its message waits (s): the TTL a
    # lock needs so that a message lost outside taskyard's paths (a queue purged by hand) cannot
    # block its key for ever. A day: longer than any backlog should wait.
    unique_ttl_s: float = Field(86_400.0, gt=0)
    # Cancel records are kept this long (s): a week, longer than any message should wait, so a
    # cancel sent while every worker is down still holds when they come back.
    cancel_retention_s: float = Field(7 * 86_400.0, gt=0)
    # `taskyard cancel --terminate`: seconds a running task gets to stop by itself (it sees
    # cancel_requested()) before its prefork child is killed.
    terminate_grace_s: float = Field(10.0, ge=0)
    # How often a worker reads new cancel records (s): a running task sees a cancel, and a
    # message reserved before the cancel is skipped, within about this.
    cancel_poll_s: float = Field(0.25, gt=0, le=10)
    # Progress is written at most this often per task (s); the last report always lands.
    progress_interval_s: float = Field(0.5, gt=0)
    # A progress report expires this long after its last write (s).
    progress_ttl_s: float = Field(86_400.0, gt=0)
    # delay_many/apply_many: messages per script call (one round trip each).
    bulk_chunk: int = Field(1000, ge=1, le=100_000)


class Settings(BaseSettings):
    """All taskyard settings, read from ``TASKYARD_*`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        # Unknown fields are refused here; unknown variables by _check_variables (the
        # environment source only reads the variables of known fields).
        extra="forbid",
        allow_inf_nan=False,
        validate_default=True,
    )

    # Redis for buffers, cache, live stats. None: the local default, or the embedded server that
    # `taskyard up` starts.
    redis_url: str | None = None
    # Celery broker. None: the Redis URL. RabbitMQ works too ("amqp://guest:guest@host//").
    broker_url: str | None = None
    # Celery result backend. None: results are not stored (tasks report through their effects).
    result_backend: str | None = None
    # Application database: history of the platform and the database whose indexes are
    # maintained. SQLite by default so the stack runs with nothing installed.
    database_url: str = "sqlite:///taskyard.db"
    # History database when it must differ from database_url.
    history_database_url: str | None = None
    # Redis key prefix, so several deployments can share one Redis.
    namespace: str = Field("taskyard", pattern=r"^[A-Za-z0-9_.-]+$")
    # Redis broker with leases off (reservation_lease_s = 0), and the Redis result backend: a
    # message not acknowledged within this is redelivered (s). Must then exceed the longest
    # countdown the platform itself schedules (deferrals, batch retries) and the longest task.
    visibility_timeout_s: float = Field(3600.0, gt=0)
    # Redis broker: how often a worker sweeps for messages whose holder died (s). A message of a
    # SIGKILLed worker runs again within reservation_lease_s (visibility_timeout_s when leases
    # are off) plus this.
    unacked_restore_interval_s: int = Field(10, ge=1)
    # Redis broker: lease of a reserved message (s). A live worker renews every message it holds
    # (reserved, running, waiting for its ETA) every third of this, and the lease replaces
    # visibility_timeout_s, so a SIGKILLed worker's messages are back in their queues within it
    # plus one sweep, while a task running for hours on a live worker is never redelivered.
    # 30 s: recovery within 40 s, at one renewal round trip per worker every 10 s. 0: off.
    reservation_lease_s: float = Field(30.0, ge=0)
    # Redis broker: a countdown/ETA message waits in Redis (a delayed set) instead of in a
    # worker's memory; off keeps Celery's behaviour (the worker holds it unacknowledged).
    broker_delays: bool = True
    # Redis broker: every worker and beat moves due delayed messages into their queues this often
    # (s): a task starts within about this of its ETA; each move is one small Lua call.
    delay_move_interval_s: float = Field(0.25, gt=0, le=5)
    # A message delivered this many times without an acknowledgement (its execution killed its
    # process: segfault, OOM killer, os._exit) goes to the dead letters as "crashed" instead of
    # running again; 5 tolerates a few unrelated worker deaths. Per task: max_deliveries=.
    max_deliveries: int = Field(5, ge=1)
    # Publishing: retries when the broker is unreachable, and the pause between them (s), so
    # .delay() fails with BrokerUnavailable in bounded time instead of hanging.
    publish_max_retries: int = Field(3, ge=0)
    publish_retry_interval_s: float = Field(0.2, ge=0)
    # Redis broker: .delay()/apply_async() without per-call options build the task message
    # themselves and publish it in one script call on a connection kept per process (the same
    # message, signals and result as Celery's path); off: every call takes Celery's path.
    fast_publish: bool = True
    # Connecting to the broker gives up after this (s).
    broker_connect_timeout_s: float = Field(4.0, gt=0)
    # Arguments (and dict keys inside arguments) whose name matches this regular expression are
    # shown as [redacted] on every surface (dashboard, API, CLI, timelines, dead letters,
    # Flower); the message keeps them, so retries and replays work. Per task: redact=(...).
    # Empty: only the tasks' own redact= names.
    redact_pattern: str = (
        r"(?i)passw|secret|token|credential|card.?(num|no)|^card$|cvv|cvc|ssn|api.?key"
        r"|authorization"
    )
    # OpenTelemetry traces: a producer span at publish and a consumer span around each run,
    # joined through the message's W3C traceparent header (taskyard.tracing). Needs the `otel`
    # extra; the exporter reads the standard OTEL_EXPORTER_OTLP_* and OTEL_SERVICE_NAME.
    tracing: bool = False
    # A read from the broker gives up after this (s): a frozen Redis (SIGSTOP, a paused VM, a
    # partition without resets) keeps connections open and answers nothing, so without it a
    # .delay() waits for ever. .delay() then raises BrokerUnavailable within
    # (publish_max_retries + 1) x (this + publish_retry_interval_s) + broker_connect_timeout_s.
    # Workers' blocking reads wait 1 s (brpop_timeout), hence the floor of 2 s.
    broker_read_timeout_s: float = Field(3.0, ge=2)
    # Workers and `taskyard up` refuse to start when the broker's Redis has a maxmemory-policy
    # that evicts (allkeys-* or volatile-*) or the buffers' Redis an allkeys-* one: such a Redis
    # silently drops queued tasks and buffered items when memory fills. True starts anyway
    # (the problem is logged as a warning), e.g. for a throwaway demo.
    allow_evicting_redis: bool = False
    # Celery task events (worker) and task-sent events (producers), so Flower sees every task.
    task_events: bool = True
    # Events are published in batches at most this often (s): a few ms of Flower latency for a
    # broker round trip saved per event.
    event_flush_interval_s: float = Field(0.1, gt=0, le=5)
    # Task events are published only while something subscribes to them (Flower, `celery
    # events`): a batch that reached nobody pauses them, and an empty batch published this
    # often (s) finds a new listener. 0 publishes them always.
    event_probe_interval_s: float = Field(1.0, ge=0, le=60)
    # Messages each pool process of a worker reserves when that worker consumes neither the
    # critical nor the high queue (workers that do reserve one). Celery's default, 4: such a
    # worker has no urgent work to protect and would otherwise idle while fetching. 1 disables.
    bulk_prefetch_multiplier: int = Field(4, ge=1, le=64)
    # Messages each prefork process reserves in a worker that does consume critical or high.
    # Such a worker starts reserved tasks most urgent first (taskyard.workers.urgent), so the
    # reserved line keeps each process busy through the next fetch, and an urgent message starts
    # on the next free process, ahead of every reserved lower task; a freed reservation is
    # fetched for within an ack delay (Channel QoS.fetch_due), so a longer line does not delay
    # it. Celery's default, 4: draining no-op tasks on -c 2, 4 fetches four messages per round
    # trip where 2 fetched two (10 % more tasks/s, 7 % less CPU per task), with the same
    # critical p99 behind 5 ms tasks (10.0 against 9.4 ms). 1: one per process.
    urgent_prefetch_multiplier: int = Field(4, ge=1, le=16)
    # Processes of the fast profile per core when -c is not given (rounded up). A solo process
    # runs one task at a time and waits on Redis between and inside its tasks: draining no-op
    # tasks, a process held the interpreter 60 % of the time. More processes than cores fill
    # those waits: on 2 cores, 3 processes drained 2-42 % faster than 2 (4 no faster than 3),
    # at -6 to +24 % CPU per task (the cores are shared). 1: one process per core.
    fast_processes_per_core: float = Field(1.5, ge=0.25, le=8)
    # Messages each process of the fast profile may reserve. One fetch round trip then serves
    # several tasks; fetch_budget_ms decides how many of these a fetch takes.
    fast_prefetch_multiplier: int = Field(16, ge=1, le=64)
    # Where a worker runs each task as it is delivered (the fast profile's solo processes), a
    # fetch brings no more messages than fit in this much run time at the rate observed so
    # far (taskyard.broker.transport: Channel.fetch_want): no-op tasks come 16 per fetch round
    # trip (measured, paired: about 10 % less CPU per task than 4), 5 ms tasks 2, and an urgent
    # message waits behind no more than about this much of its process's reserved work.
    # Prefork workers hand tasks on as they are delivered, so there the prefetch decides.
    # 0: off (the prefetch alone decides).
    fetch_budget_ms: float = Field(10.0, ge=0, le=10_000)
    # Solo-pool workers (the fast profile) run taskyard tasks on the lean execution path
    # (taskyard.workers.lean: the tracer called straight from the fetched message, no Request
    # and no pool hand-off). false: every task takes Celery's own strategy.
    lean_path: bool = True
    # Level of a task that no decorator or rule places.
    default_level: str = "normal"
    # Ordered rules task name -> level, as JSON:
    # [{"pattern": "bdc.tasks.report_*", "level": "low"}, {"pattern": "...", "kind": "regex", ...}].
    routing_rules: list[RoutingRule] = []
    # Worker profiles: name -> queues in strict priority order.
    worker_profiles: dict[str, list[str]] = {
        "critical": ["critical", "high"],
        "default": ["normal", "low"],
        "batch": ["batch"],
        "all": ["critical", "high", "normal", "low", "batch"],
    }

    batch: BatchSettings = BatchSettings()
    guard: GuardSettings = GuardSettings()
    cache: CacheSettings = CacheSettings()
    maintenance: MaintenanceSettings = MaintenanceSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    dead_letters: DeadLetterSettings = DeadLetterSettings()
    jobs: JobSettings = JobSettings()

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        return None if value is None else _check_redis_url(value)

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str | None) -> str | None:
        return None if value is None else _check_scheme(value, BROKER_SCHEMES, "broker URL")

    @field_validator("result_backend")
    @classmethod
    def _result_backend_scheme(cls, value: str | None) -> str | None:
        return None if value is None else _check_result_backend(value)

    @field_validator("database_url", "history_database_url")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        return None if value is None else _check_database_url(value)

    @field_validator("worker_profiles")
    @classmethod
    def _profiles_not_empty(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, queues in value.items():
            if not queues:
                raise ValueError(f"profile {name!r} lists no queues")
        return value

    @property
    def effective_redis_url(self) -> str:
        """Redis URL in use: the configured one or the local default."""
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def effective_broker_url(self) -> str:
        """Broker URL in use: the configured one or the Redis URL."""
        return self.broker_url or redis_broker_url(self.effective_redis_url)

    @property
    def effective_history_url(self) -> str:
        """History database URL in use."""
        return self.history_database_url or self.database_url


def _variable_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + NESTED_DELIMITER.join(str(part).upper() for part in loc)


def _section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def variable_names() -> Iterator[str]:
    """Every ``TASKYARD_*`` variable that names a setting (sections as ``SECTION__FIELD``)."""
    for name, field in Settings.model_fields.items():
        section = _section(field.annotation)
        if section is None:
            yield _variable_name((name,))
        else:
            for inner in section.model_fields:
                yield _variable_name((name, inner))


def _check_variables(environ: Mapping[str, str]) -> None:
    """Refuse a ``TASKYARD_*`` variable that names no setting, naming the closest one."""
    known = set(variable_names())
    for variable in environ:
        upper = variable.upper()
        if (
            not upper.startswith(ENV_PREFIX)
            or upper in known
            or upper in NOT_SETTINGS
            or upper.startswith(NOT_SETTINGS_PREFIXES)
        ):
            continue
        # Deeper parts are keys of a mapping field (TASKYARD_CACHE__TTL_S__USER).
        parts = upper[len(ENV_PREFIX) :].split(NESTED_DELIMITER)
        if _mapping_key(parts):
            continue
        raise ConfigurationError(
            f"unknown setting {variable}{did_you_mean(upper, known)}",
            setting=variable,
            value=environ[variable],
        )


def _mapping_key(parts: list[str]) -> bool:
    fields: dict[str, Any] = dict(Settings.model_fields)
    for depth, part in enumerate(parts):
        field = fields.get(part.lower())
        if field is None:
            return False
        section = _section(field.annotation)
        if section is not None:
            fields = dict(section.model_fields)
            continue
        return depth < len(parts) - 1 and get_origin(field.annotation) is dict
    return False


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with keyword overrides taking precedence.

    Raises:
        ConfigurationError: a value is malformed; the message names the variable and what it
            expected.
    """
    _check_variables(os.environ)
    try:
        return Settings(**overrides)
    except SettingsError as exc:
        # Raised for list and mapping fields whose environment value is not JSON.
        match = re.search(r'field "([^"]+)"', str(exc))
        variable = _variable_name(tuple(match.group(1).split("."))) if match else ENV_PREFIX
        raise ConfigurationError(
            f"invalid settings: {variable} is not valid JSON; expected a JSON list or object",
            setting=variable,
        ) from None
    except ValidationError as exc:
        problems = []
        first_loc: tuple[int | str, ...] = ()
        first_value: Any = None
        for err in exc.errors():
            loc = tuple(err["loc"])
            if not first_loc:
                first_loc, first_value = loc, err.get("input")
            if err["type"] == "extra_forbidden":
                problems.append(
                    f"unknown setting {_variable_name(loc)}"
                    f"{did_you_mean(_variable_name(loc), variable_names())}"
                )
            else:
                problems.append(f"{_variable_name(loc)}={err.get('input')!r}: {err['msg']}")
        raise ConfigurationError(
            "invalid settings: " + "; ".join(problems),
            setting=_variable_name(first_loc),
            value=first_value,
        ) from None
