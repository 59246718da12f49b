"""``create_app``: a Celery app configured for the five-level platform.

The configuration lives in the app, not in the command line, so a plain
``celery -A APP worker -Q critical`` behaves exactly like ``taskyard worker --profile critical``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any, NamedTuple

from celery import Celery
from celery.app import defaults as celery_defaults
from celery.signals import after_task_publish, worker_init

from taskyard import results, serialization
from taskyard.broker import REDIS_TRANSPORT, SENTINEL_TRANSPORT, broker_transport_config
from taskyard.broker.delays import install as install_delays
from taskyard.broker.memory import install as install_eviction_check
from taskyard.broker.publish import Publisher
from taskyard.config import Settings, is_redis_url, load_settings
from taskyard.errors import ConfigurationError, did_you_mean
from taskyard.keys import Keys
from taskyard.monitoring.events import EventBatching, SentEvents, on_after_task_publish
from taskyard.routing.levels import build_queues, parse_level
from taskyard.routing.rules import CompiledRule, Router
from taskyard.routing.task import TaskyardTask
from taskyard.runtime import (
    PeriodicJob,
    Runtime,
    TaskyardApp,
    attach,
    find_runtime,
    sending_app,
)
from taskyard.workers import speedups
from taskyard.workers.prefetch import BulkPrefetch
from taskyard.workers.shutdown import StopFlush
from taskyard.workers.urgent import UrgentFirstStep

#: Keywords of create_app that are Celery settings: new-style names, and the old upper-case
#: ones (celery.app.defaults; _TO_NEW_KEY maps each old name to its new one).
CELERY_SETTINGS = frozenset(celery_defaults.SETTING_KEYS) | frozenset(celery_defaults._TO_NEW_KEY)


def celery_config(settings: Settings, router: Router) -> dict[str, Any]:
    """Celery settings for the platform, derived from taskyard's settings."""
    broker = settings.effective_broker_url
    default = router.default.value
    config: dict[str, Any] = {
        "broker_url": broker,
        # Without a backend, reading a result says how to get one (taskyard.results).
        "result_backend": settings.result_backend or results.BACKEND_PATH,
        "task_ignore_result": settings.result_backend is None,
        # JSON only: no pickle is accepted anywhere, by tasks, results or events. Task arguments
        # follow taskyard's JSON policy (taskyard.serialization: no NaN/infinity), still sent as
        # application/json, which "json" accepts.
        "task_serializer": serialization.SERIALIZER,
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_queues": build_queues(),
        "task_default_queue": default,
        "task_default_exchange": "taskyard",
        "task_default_exchange_type": "direct",
        "task_default_routing_key": default,
        "task_create_missing_queues": False,
        "task_routes": (router,),
        # Levels are separate queues; message priorities inside a queue are not used, so every
        # message carries the same explicit priority.
        "task_default_priority": 0,
        # A worker reserves one message per process and acknowledges after the task: a critical
        # message never waits behind prefetched low work, and a killed worker's task runs again.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Flower and the monitoring see every task from the moment it is sent. task-sent events
        # are batched by taskyard.monitoring.events instead of Celery's publish-per-send.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
        "task_track_started": True,
        # .delay() with the broker down fails in bounded time instead of hanging.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": settings.publish_max_retries,
            "interval_start": 0,
            "interval_step": settings.publish_retry_interval_s,
            "interval_max": settings.publish_retry_interval_s,
        },
        "broker_connection_timeout": settings.broker_connect_timeout_s,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": True,
    }
    if is_redis_url(broker):
        config["broker_transport_options"] = {
            # Poll queues strictly in -Q order (kombu >= 5.7 keeps that order).
            "queue_order_strategy": "priority",
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for abandoned messages on every interval, not on every tenth (kombu's default).
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,
            # Leased reservations (taskyard.broker.transport): a live worker renews what it
            # holds and the lease replaces visibility_timeout in the restore sweep. 0: off.
            "reservation_lease": settings.reservation_lease_s,
            # Most run time one fetch brings where tasks run as delivered (the fast profile).
            "fetch_budget": settings.fetch_budget_ms / 1000,
            # Broker-side delays (taskyard.broker.delays): countdown/ETA messages wait in Redis.
            "taskyard_namespace": settings.namespace,
            "taskyard_delays": settings.broker_delays,
            "socket_connect_timeout": settings.broker_connect_timeout_s,
            # kombu's channel passes socket_timeout=None to redis-py unless told: a frozen
            # broker would then hang every .delay(). Above brpop_timeout (1 s), the longest
            # read a consumer blocks in, so an idle worker never times out its own wait.
            "socket_timeout": settings.broker_read_timeout_s,
        }
        # taskyard's own Redis transport (atomic fetch, batched acks, leases); Celery hands
        # broker_transport to kombu.Connection, where it wins over the URL scheme.
        config.update(broker_transport_config(broker))
        config["result_backend_transport_options"] = {
            "visibility_timeout": settings.visibility_timeout_s
        }
    else:
        config["broker_transport_options"] = {
            "connect_timeout": settings.broker_connect_timeout_s,
        }
    return config


class TaskyardCelery(Celery):  # type: ignore[misc]
    """Celery app that tells the batched task-sent events which app sent a task, and closes
    its fast publisher's connection with its own."""

    @cached_property
    def AsyncResult(self) -> Any:
        """Celery's result class, refusing ``get()`` clearly when results are not stored."""
        return self.subclass_with_self(results.TaskyardAsyncResult)

    def send_task(self, *args: Any, **kwargs: Any) -> Any:
        token = sending_app.set(self)
        try:
            return super().send_task(*args, **kwargs)
        finally:
            sending_app.reset(token)

    def close(self) -> None:
        """Stop this app's background threads (metric capture, task-sent events) after a
        last flush, then close its connections."""
        runtime = find_runtime(self)
        if runtime is not None:
            for service in (runtime.capture, runtime.sent_events, runtime.publisher):
                if service is not None:
                    service.close()
        super().close()


class Part(NamedTuple):
    """One part as create_app wires it."""

    #: Registers the part's tasks, signal receivers and steps on the app (no I/O).
    install: Callable[[TaskyardApp, Runtime], object]
    #: The part's periodic jobs by task name, from settings (beat schedules them).
    periodic_jobs: Callable[[Settings], dict[str, PeriodicJob]] | None = None


def _parts() -> tuple[Part, ...]:
    """Every part, in wiring order.

    Imported here, not at the top: the parts import the public package, which imports this
    module.
    """
    from taskyard import (
        batching,
        beat,
        cache,
        database,
        deadletters,
        flow,
        maintenance,
        monitoring,
        redaction,
        tracing,
    )
    from taskyard.broker.control import service as jobs
    from taskyard.workers import guards

    return (
        Part(jobs.install),  # job control: durable cancel (revoke too), the watcher, progress
        Part(batching.install, batching.periodic_jobs),  # flush and reaper tasks, flusher
        Part(database.install),  # engines disposed in every prefork child
        Part(cache.install, cache.periodic_jobs),  # cache warming
        Part(maintenance.install, maintenance.periodic_jobs),  # index maintenance
        Part(beat.install),  # the beat schedule of every part's periodic jobs
        Part(guards.install),  # admission, back-pressure, accounting, heartbeat
        Part(deadletters.install),  # poison quarantine, bounded redelivery, dead letters
        Part(monitoring.install, monitoring.periodic_jobs),  # metric capture, stats collection
        Part(flow.install),  # flow limits registered at worker start, partition values on publish
        Part(redaction.install),  # what published messages show of their arguments
        Part(tracing.install),  # OpenTelemetry spans at publish and around each run (when on)
    )


def _periodic_jobs(parts: tuple[Part, ...], settings: Settings) -> dict[str, PeriodicJob]:
    """Every part's periodic jobs, by task name."""
    jobs: dict[str, PeriodicJob] = {}
    for part in parts:
        if part.periodic_jobs is not None:
            jobs.update(part.periodic_jobs(settings))
    return jobs


def _check_schedule(settings: Settings, jobs: dict[str, PeriodicJob]) -> None:
    """Refuse a schedule setting that names no periodic job of the platform."""
    names = sorted(jobs)
    named = (
        ("TASKYARD_SCHEDULE__INTERVALS_S", list(settings.schedule.intervals_s)),
        ("TASKYARD_SCHEDULE__DISABLED", settings.schedule.disabled),
    )
    for variable, given in named:
        for job in given:
            if job not in jobs:
                raise ConfigurationError(
                    f"{variable} names {job!r}, which is not a periodic job of the platform"
                    f"{did_you_mean(job, names)}; the jobs are: {', '.join(names)}",
                    setting=variable,
                    value=job,
                )


def create_app(
    name: str, include: list[str] | tuple[str, ...] | None = None, **overrides: Any
) -> TaskyardApp:
    """Return a Celery app configured for taskyard.

    Keyword overrides that name a taskyard setting (``broker_url``, ``routing_rules``, ...)
    override the environment; those that name a Celery setting (``task_time_limit``, ...) are
    set on the Celery configuration.

    Raises:
        ConfigurationError: a setting is malformed (the message names the variable), or a
            keyword is neither a taskyard nor a Celery setting (the message names the closest).
        RoutingError: a routing rule, the default level or a worker profile names an unknown level.
    """
    setting_names = set(Settings.model_fields)
    for key, value in overrides.items():
        if key not in setting_names and key not in CELERY_SETTINGS:
            raise ConfigurationError(
                f"create_app() got {key}={value!r}, which is neither a taskyard setting nor a "
                f"Celery setting{did_you_mean(key, setting_names | CELERY_SETTINGS)}",
                setting=key,
                value=value,
            )
    settings = load_settings(**{k: v for k, v in overrides.items() if k in setting_names})
    celery_overrides = {k: v for k, v in overrides.items() if k not in setting_names}
    parts = _parts()
    jobs = _periodic_jobs(parts, settings)
    _check_schedule(settings, jobs)

    default = parse_level(settings.default_level, where="TASKYARD_DEFAULT_LEVEL")
    rules = [
        CompiledRule.from_rule(rule, source="TASKYARD_ROUTING_RULES rule")
        for rule in settings.routing_rules
    ]
    for profile, queues in settings.worker_profiles.items():
        for queue in queues:
            parse_level(queue, where=f"queue in TASKYARD_WORKER_PROFILES[{profile!r}]:")
    router = Router(rules, default)

    serialization.register()
    app = TaskyardCelery(name, include=list(include or ()), task_cls=TaskyardTask)
    # Attached first: the app is a taskyard app from here on, whenever Celery finalizes it.
    runtime = Runtime(
        settings=settings, keys=Keys(settings.namespace), router=router, periodic_jobs=jobs
    )
    attach(app, runtime)
    app.conf.update(celery_config(settings, router))
    app.conf.update(celery_overrides)
    router.app = app
    if settings.fast_publish and app.conf.get("broker_transport") in (
        REDIS_TRANSPORT,
        SENTINEL_TRANSPORT,
    ):
        runtime.publisher = Publisher(app, router)
    if settings.task_events:
        runtime.sent_events = SentEvents(
            app, settings.event_flush_interval_s, settings.event_probe_interval_s
        )
        after_task_publish.connect(
            on_after_task_publish, dispatch_uid="taskyard.sent_events", weak=False
        )
        app.steps["consumer"].add(EventBatching)
    app.steps["consumer"].add(BulkPrefetch)
    app.steps["worker"].add(UrgentFirstStep)
    # A warm stop lets the pool processes finish and acknowledge what they already received.
    app.steps["worker"].add(StopFlush)
    # Faster equivalents of three steps of Celery's tracer, in the worker and its pool children.
    worker_init.connect(speedups.on_worker_init, weak=False, dispatch_uid="taskyard.speedups")
    if settings.lean_path:
        speedups.cache_publish_receivers()
    install_eviction_check(app)  # a worker refuses a Redis that evicts
    install_delays(app)  # the delayed-message movers: a consumer bootstep and beat's thread
    for part in parts:
        part.install(app, runtime)
    return app
