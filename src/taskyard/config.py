"""Settings: the only place in taskyard that reads the environment.

Every field reads ``TASKYARD_<FIELD>``; fields of a section read ``TASKYARD_<SECTION>__<FIELD>``
(for example ``TASKYARD_GUARD__MEMORY_WARNING_PCT=75``). Lists and mappings are given as JSON.
Time is in seconds, memory in megabytes, ratios in percent, as the field names say.

Importing this module does no I/O; :func:`load_settings` reads the environment when called and
turns any malformed value into a :class:`~taskyard.errors.ConfigurationError` that names the
variable and what it expected.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from taskyard.errors import ConfigurationError

ENV_PREFIX = "TASKYARD_"
NESTED_DELIMITER = "__"

#: Redis the platform falls back to when nothing is configured: the local server, database 0.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class RoutingRule(BaseModel):
    """One routing rule: task names matching ``pattern`` go to ``level``.

    ``kind="glob"`` matches with shell wildcards (``bdc.tasks.report_*``); ``kind="regex"`` with a
    regular expression that must match the whole task name.
    """

    pattern: str
    level: str
    kind: Literal["glob", "regex"] = "glob"


class BatchSettings(BaseModel):
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


class GuardSettings(BaseModel):
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
    # Levels whose consumers are paused above the warning threshold (critical never is).
    pausable_levels: list[str] = ["low", "batch"]
    # Per level: when its tasks are held back: "never", "warning", "critical" (memory or CPU
    # above that threshold), "memory_warning", "memory_critical" (memory only).
    level_policy: dict[
        str, Literal["never", "warning", "critical", "memory_warning", "memory_critical"]
    ] = {
        "critical": "never",
        "high": "memory_critical",
        "normal": "warning",
        "low": "warning",
        "batch": "warning",
    }
    # A held-back task is re-published after this delay plus up to defer_jitter_s (s). Both
    # must stay far below the broker's visibility timeout (the Redis broker redelivers after it).
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
    # Memory deferrals back off exponentially: the n-th waits (countdown + jitter) * 2^(n-1),
    # at most this long (s); must stay below half the broker visibility timeout.
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


class CacheSettings(BaseModel):
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


class MaintenanceSettings(BaseModel):
    """Index maintenance of the application database."""

    # "module:attribute" of the SQLAlchemy MetaData whose declared indexes are maintained.
    metadata: str = "examples.bdc.models:Base.metadata"
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


class ScheduleSettings(BaseModel):
    """The beat schedule of the platform's periodic jobs (intervals default to each section's)."""

    # Task names left out of the beat schedule, e.g. ["taskyard.maintenance.run"] where another
    # system maintains the database.
    disabled: list[str] = []
    # Interval overrides per task name (s), e.g. {"taskyard.cache.warm": 60}. Intervals under 1 s
    # are raised to 1 s: beat cannot usefully tick faster.
    intervals_s: dict[str, float] = {}
    # Run the cache warmers once when the workers start (once cluster-wide, not once per worker).
    warm_on_start: bool = True


class MonitoringSettings(BaseModel):
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
    # Stats API responses (overview, lists, /metrics) are reused for this long (s): a burst of
    # requests or scrapes costs one store read. 0 reads the store on every request.
    api_cache_s: float = Field(1.0, ge=0, le=60)
    # Flower bind address and basic-auth credentials ("user:password").
    flower_port: int = Field(5555, ge=1, le=65535)
    # Flower bind address: loopback by default; "0.0.0.0" in a container so its port publishes.
    flower_host: str = "127.0.0.1"
    flower_basic_auth: str = "admin:taskyard"
    # Alert thresholds (defaults of the service this platform serves).
    alert_memory_warning_pct: float = 80.0
    alert_memory_critical_pct: float = 90.0
    alert_cpu_warning_pct: float = 80.0
    alert_cpu_critical_pct: float = 90.0
    alert_slow_queries: int = 10
    alert_cache_hit_rate_pct: float = 50.0
    alert_slow_task_rate_pct: float = 10.0
    alert_queue_depth: int = 1000
    # Prometheus semantics: a condition must hold this long before its alert fires (pending until
    # then) and be gone this long before it resolves (s), so one noisy reading neither fires nor
    # resolves an alert. Per rule in alert_timing ({"HostCpuHigh": {"for_s": 120}}): CPU on a
    # shared host is bursty, a missing heartbeat already waited two heartbeat intervals.
    alert_for_s: float = Field(30.0, ge=0)
    alert_resolve_s: float = Field(60.0, ge=0)
    alert_timing: dict[str, dict[str, float]] = {
        "HostCpuHigh": {"for_s": 120.0, "resolve_s": 120.0},
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


class DeadLetterSettings(BaseModel):
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


class Settings(BaseSettings):
    """All taskyard settings, read from ``TASKYARD_*`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        extra="ignore",
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
    # Redis broker: a message not acknowledged within this is redelivered (s). Must exceed the
    # longest countdown the platform itself schedules (deferrals, batch retries) and the longest
    # task; one hour by default.
    visibility_timeout_s: float = Field(3600.0, gt=0)
    # Redis broker: how often a worker sweeps for messages whose holder died (s). A message of a
    # SIGKILLed worker runs again within visibility_timeout_s plus this.
    unacked_restore_interval_s: int = Field(10, ge=1)
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
    # Connecting to the broker gives up after this (s).
    broker_connect_timeout_s: float = Field(4.0, gt=0)
    # Celery task events (worker) and task-sent events (producers), so Flower sees every task.
    task_events: bool = True
    # Events are published in batches at most this often (s): a few ms of Flower latency for a
    # broker round trip saved per event.
    event_flush_interval_s: float = Field(0.1, gt=0, le=5)
    # Messages each pool process of a worker reserves when that worker consumes neither the
    # critical nor the high queue (workers that do reserve one). Celery's default, 4: such a
    # worker has no urgent work to protect and would otherwise idle while fetching. 1 disables.
    bulk_prefetch_multiplier: int = Field(4, ge=1, le=64)
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
        return self.broker_url or self.effective_redis_url

    @property
    def effective_history_url(self) -> str:
        """History database URL in use."""
        return self.history_database_url or self.database_url


def _variable_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + NESTED_DELIMITER.join(str(part).upper() for part in loc)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with keyword overrides taking precedence.

    Raises:
        ConfigurationError: a value is malformed; the message names the variable and what it
            expected.
    """
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
            problems.append(f"{_variable_name(loc)}={err.get('input')!r}: {err['msg']}")
        raise ConfigurationError(
            "invalid settings: " + "; ".join(problems),
            setting=_variable_name(first_loc),
            value=first_value,
        ) from None
