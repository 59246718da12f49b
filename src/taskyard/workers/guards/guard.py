"""The guard of one app: admission before every task, accounting, heartbeat, back-pressure.

One :class:`Guard` per app (``runtime.guard``). The app task class's ``before_start``
(installed by :mod:`.install`) calls :meth:`Guard.before_task` in the process that runs the
task; the worker's main process runs the heartbeat and the back-pressure valve
(:mod:`.backpressure`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import Any

from taskyard.errors import ConfigurationError
from taskyard.runtime import Runtime
from taskyard.workers.guards.accounting import TaskMeter
from taskyard.workers.guards.backpressure import Valve
from taskyard.workers.guards.defer import DEFERRED, LIMITED, OVERDUE, Counters, Deferrer
from taskyard.workers.guards.heartbeat import Heartbeat, base_record
from taskyard.workers.guards.policy import Policy
from taskyard.workers.guards.readings import Probe, ReadingSource, Sampler

log = logging.getLogger("taskyard.guards")


#: The machine this process runs on: host-level alerts group workers by it.
HOST = socket.gethostname()


def consumed_queues(worker: Any) -> list[str]:
    """Names of the queues a worker consumes (its ``-Q``), from the app's selection.

    ``WorkController.setup_queues`` selects them on ``app.amqp.queues`` before the pool forks.
    """
    app = getattr(worker, "app", None)
    if app is None:
        return []
    try:
        return list(app.amqp.queues.consume_from or app.amqp.queues)
    except Exception:  # an app without a configured amqp: nothing to decide from
        return []


AUTOGROUP_SWITCH = "/proc/sys/kernel/sched_autogroup_enabled"


def lower_autogroup(nice: int) -> bool:
    """Lower this session's CPU share where the kernel schedules by session (autogroup).

    With autogroup scheduling (processes in the root cgroup, as on most VMs and desktops) the
    kernel first shares the CPU equally between sessions, and a nice value only orders the
    processes inside one session: measured here, two niced pool processes still took a third of
    both cores beside two busy loops in other sessions, the same as un-niced. Writing the nice
    value to ``/proc/self/autogroup`` lowers the whole session's share. Done only when this
    process leads its session (``taskyard up``, a supervisor's child): a worker started from a
    shell shares the shell's session, which must not be slowed. Under a cgroup (systemd,
    containers) autogroup does not apply and the per-process nice already works.
    """
    try:
        with open(AUTOGROUP_SWITCH) as switch:
            if switch.read().strip() != "1":
                return False
        if os.getsid(0) != os.getpid():
            log.info(
                "pool nice %d: this worker shares its session with others, so only its "
                "pool processes are niced (autogroup scheduling)",
                nice,
            )
            return False
        with open("/proc/self/autogroup", "w") as group:
            group.write(str(nice))
    except OSError as exc:
        log.info("pool nice %d: autogroup left as it is (%s)", nice, exc)
        return False
    return True


def _finite(value: float) -> float | None:
    return round(value, 2) if math.isfinite(value) else None


class Guard:
    """Resource guard state of one app in one process (reset for pool children by fork)."""

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings.guard
        self.settings = settings
        self.enabled = settings.enabled
        # With leased reservations (taskyard.broker) a held countdown message is renewed, never
        # redelivered; only without them does the visibility timeout bound countdowns.
        limit = (
            math.inf
            if runtime.settings.reservation_lease_s
            else runtime.settings.visibility_timeout_s / 2
        )
        if settings.defer_countdown_s + settings.defer_jitter_s >= limit:
            raise ConfigurationError(
                f"TASKYARD_GUARD__DEFER_COUNTDOWN_S + DEFER_JITTER_S = "
                f"{settings.defer_countdown_s + settings.defer_jitter_s:g} s must stay below half "
                f"the broker visibility timeout ({limit:g} s)",
                setting="TASKYARD_GUARD__DEFER_COUNTDOWN_S",
                value=settings.defer_countdown_s,
            )
        max_countdown = settings.defer_max_countdown_s
        if "defer_max_countdown_s" not in settings.model_fields_set:
            # The default cap follows a short visibility timeout down instead of refusing it.
            max_countdown = min(
                max_countdown,
                max(settings.defer_countdown_s + settings.defer_jitter_s, 0.9 * limit),
            )
        elif max_countdown >= limit:
            raise ConfigurationError(
                f"TASKYARD_GUARD__DEFER_MAX_COUNTDOWN_S = {settings.defer_max_countdown_s:g} s "
                f"must stay below half the broker visibility timeout ({limit:g} s)",
                setting="TASKYARD_GUARD__DEFER_MAX_COUNTDOWN_S",
                value=settings.defer_max_countdown_s,
            )
        self.default_level = runtime.settings.default_level
        self.policy = Policy(settings, self.default_level)
        probe = Probe(settings.memory_source, exclude_own_cpu=settings.cpu_exclude_own)
        self.sampler = Sampler(probe, settings.sample_interval_s, settings.cpu_window_s)
        #: Where admission and the valve read from; tests put a MemoryReadings here.
        self.source: ReadingSource = self.sampler
        self.counters = Counters()
        self.deferrer = Deferrer(
            settings.defer_countdown_s,
            settings.defer_jitter_s,
            settings.max_defer_age_s,
            self.counters,
            max(max_countdown, settings.defer_countdown_s),
        )
        self.meter: TaskMeter | None = None
        if settings.accounting:
            self.meter = TaskMeter(
                lambda: runtime.redis,
                runtime.keys.task_resources(),
                settings.accounting_flush_interval_s,
                counters_add=lambda n: self.counters.add(LIMITED, n),
            )
        self.valve: Valve | None = None
        if settings.enabled:
            self.valve = Valve(settings)
        self.heartbeat = Heartbeat(
            lambda: runtime.redis,
            runtime.keys.worker_heartbeat,
            runtime.keys.workers(),
            settings.heartbeat_interval_s,
            settings.heartbeat_slack_s,
            self.record,
        )
        #: Set in the worker's main process by worker_init; inherited by pool children.
        self.in_worker = False
        self.queues: list[str] = []
        #: Nice value added to this worker's pool processes (0: none; see :meth:`on_worker_init`).
        self.pool_nice = 0

    # --- task path (the process that runs the task) --------------------------------------
    def before_task(self, task: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Admit, defer (raises ``Ignore``) or run overdue; then start measuring the run."""
        request = task.request
        if request.is_eager:
            return
        if self.enabled:
            if self.sampler.idle:
                self.sampler.ensure_running()
            delivery = request.delivery_info
            level = (delivery.get("routing_key") if delivery else None) or self.default_level
            held = self.policy.hold(level, self.source.current(), task.requires_memory_mb)
            if held is not None:
                self.deferrer.hold(task, args, kwargs, level, held.text, held.kind)
        if self.meter is not None:
            self.meter.start(task, task_id)

    def after_task(self, task: Any, status: str) -> None:
        if self.meter is not None and not task.request.is_eager:
            self.meter.stop(status == "FAILURE")

    # --- worker life cycle ---------------------------------------------------------------
    def on_worker_init(self, worker: Any = None) -> None:
        """Main process, before the pool forks: share counters, start sampling, and decide
        whether the pool runs at a lower OS priority (the worker consumes only nice levels)."""
        self.in_worker = True
        self.counters.share()
        self.sampler.ensure_running()
        queues = consumed_queues(worker)
        if (
            self.enabled
            and queues
            and self.settings.pool_nice > 0
            and all(q in self.settings.nice_levels for q in queues)
        ):
            self.pool_nice = self.settings.pool_nice
            lower_autogroup(self.pool_nice)

    def on_process_init(self) -> None:
        """A pool child just forked: lower priority, its own sampler thread, limit enforcement."""
        if not self.in_worker:
            return
        if self.pool_nice:
            try:
                # Only the pool child: the main process keeps consuming, acking and sending
                # heartbeats at full priority, so a niced worker is slow, never unresponsive.
                os.nice(self.pool_nice)
            except OSError as exc:
                log.warning("pool process %d: could not lower its priority (%s)", os.getpid(), exc)
        if self.meter is not None:
            self.meter.install_enforcement()
            self.sampler.hooks.append(self.meter.check_limits)
        self.sampler.ensure_running()

    def on_process_shutdown(self) -> None:
        if self.meter is not None:
            self.meter.flush()

    def on_consumer_start(self, consumer: Any) -> None:
        self.in_worker = True
        if not self.queues:
            # First start only: after a reconnect the consumer lacks the queues paused now.
            self.queues = [q.name for q in consumer.task_consumer.queues]
        if self.valve is not None:
            self.valve.bind(self.queues)
        self.sampler.ensure_running()
        self.heartbeat.start(consumer.hostname)

    def on_consumer_shutdown(self) -> None:
        self.heartbeat.stop(remove=True)
        if self.meter is not None:
            self.meter.flush()
        self.sampler.stop()

    @property
    def valve_interval_s(self) -> float | None:
        """Seconds between :meth:`valve_tick` calls; None without a back-pressure valve."""
        return self.settings.sample_interval_s if self.valve is not None else None

    def valve_tick(self, consumer: Any) -> None:
        if self.valve is not None:
            self.valve.tick(consumer, self.source.current())

    def record(self) -> dict[str, Any]:
        """The heartbeat record (see docs/guards.md for the fields)."""
        reading = self.source.current()
        hostname = self.heartbeat.hostname or ""
        data = base_record(hostname)
        data.update(
            queues=list(self.queues),
            paused_queues=list(self.valve.paused) if self.valve is not None else [],
            paused_reasons=dict(self.valve.reasons) if self.valve is not None else {},
            host=HOST,
            host_cpu_pct=round(reading.host_cpu_pct, 2),
            pool_nice=self.pool_nice,
            memory_pct=round(reading.memory_pct, 2),
            cpu_pct=round(reading.cpu_pct, 2),
            memory_source=reading.memory_source,
            memory_available_mb=_finite(reading.memory_available_mb),
            memory_total_mb=_finite(reading.memory_total_mb),
            state=self.policy.pressure(reading).label,
            deferred=self.counters.get(DEFERRED),
            deferred_by_reason=self.counters.by_reason(),
            overdue=self.counters.get(OVERDUE),
            limit_exceeded=self.counters.get(LIMITED),
            guards_enabled=self.enabled,
            interval_s=self.heartbeat.interval_s,
        )
        return data
