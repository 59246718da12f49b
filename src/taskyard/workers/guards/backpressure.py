"""Worker back-pressure: lower levels held back at the source, with hysteresis.

Deferring a task costs a round trip to the broker; pausing the consumer of a queue means the
worker does not pull that work at all while it is loaded. Three bands, each pausing above its
threshold and resuming only below a lower one, so the valve does not flap around one value:

* memory above ``memory_warning_pct`` pauses ``pausable_levels`` (low, batch) until memory drops
  below ``resume_pct``;
* CPU above ``cpu_warning_pct`` pauses ``cpu_pause_levels`` (low, batch) until below
  ``cpu_resume_pct``;
* CPU above ``cpu_critical_pct`` also pauses ``cpu_critical_pause_levels`` (normal) until below
  ``cpu_critical_resume_pct``.

Critical and high are never paused for CPU, critical never at all. The CPU reading is everyone
else's load (the worker's own is left out), so a worker that paused its queues never sees it
drop; a queue paused for CPU is therefore consumed again for ``cpu_release_s`` after being held
``cpu_max_hold_s``: held levels slow down under a neighbour that never stops, they do not starve.

Runs in the worker's main process: :class:`GuardStep` is a consumer bootstep whose timer callback
runs in the consumer's own event loop, where ``cancel_task_queue``/``add_task_queue`` are safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps

from taskyard.config import GuardSettings
from taskyard.routing.levels import Priority
from taskyard.runtime import runtime_of
from taskyard.workers.guards.readings import Reading

log = logging.getLogger("taskyard.guards")

#: Never paused for CPU: their latency is what holding the rest back protects.
NEVER_FOR_CPU = frozenset({Priority.CRITICAL.value, Priority.HIGH.value})
#: Why a queue is paused, as shown in logs and the heartbeat.
MEMORY, CPU, CPU_CRITICAL = "memory", "cpu", "cpu-critical"


class Band:
    """One reading against a pause threshold and a lower resume threshold."""

    def __init__(self, above: float, below: float) -> None:
        if below > above:
            raise ValueError(
                f"resume threshold {below:g} must not exceed pause threshold {above:g}"
            )
        self.above = above
        self.below = below
        self.active = False

    def update(self, value: float) -> bool:
        """Whether the band holds now: on strictly above ``above``, off strictly below ``below``."""
        if self.active:
            if value < self.below:
                self.active = False
        elif value > self.above:
            self.active = True
        return self.active


class Valve:
    """Decides which of one consumer's queues are paused, and applies it."""

    def __init__(
        self, settings: GuardSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.memory = Band(settings.memory_warning_pct, settings.resume_pct)
        self.cpu = Band(settings.cpu_warning_pct, settings.cpu_resume_pct)
        self.cpu_critical = Band(
            settings.cpu_critical_pct,
            min(settings.cpu_critical_resume_pct, settings.cpu_critical_pct),
        )
        # Critical is never paused, whatever the settings say.
        self.memory_levels = frozenset(settings.pausable_levels) - {Priority.CRITICAL.value}
        self.cpu_levels = frozenset(settings.cpu_pause_levels) - NEVER_FOR_CPU
        self.cpu_critical_levels = (
            self.cpu_levels | frozenset(settings.cpu_critical_pause_levels)
        ) - NEVER_FOR_CPU
        self.max_hold_s = settings.cpu_max_hold_s
        self.release_s = settings.cpu_release_s
        self.clock = clock
        self.queues: list[str] = []
        #: Paused queue -> why (MEMORY, CPU or CPU_CRITICAL), in ``-Q`` order.
        self.reasons: dict[str, str] = {}
        #: Band changes (pressure started or ended); release windows are not counted.
        self.transitions = 0
        self._bands = (False, False, False)
        # The CPU hold runs one cycle for all its queues, so they are released together and
        # re-added in -Q order.
        self._hold_started: float | None = None
        self._released_until: float | None = None
        # The order of the queues the consumer has now (re-added ones come last).
        self._order: list[str] = []

    @property
    def paused(self) -> list[str]:
        return list(self.reasons)

    def bind(self, queues: list[str]) -> None:
        """The queues the worker consumes (its -Q, in order), before any pause."""
        if not self.queues:
            self.queues = list(queues)
            self._order = list(queues)

    def _cpu_held(self, now: float) -> bool:
        """Whether the CPU hold is in its holding phase (else released for a while)."""
        if self._released_until is not None:
            if now < self._released_until:
                return False
            self._released_until = None
        if self._hold_started is None:
            self._hold_started = now
        if now - self._hold_started >= self.max_hold_s:
            self._hold_started = None
            self._released_until = now + self.release_s
            return False
        return True

    def wanted(self, reading: Reading) -> dict[str, str]:
        """Queue -> reason for every queue that must be paused after this reading."""
        memory = self.memory.update(reading.memory_pct)
        cpu = self.cpu.update(reading.cpu_pct)
        critical = self.cpu_critical.update(reading.cpu_pct)
        cpu_levels = (
            self.cpu_critical_levels if critical else self.cpu_levels if cpu else frozenset()
        )
        out: dict[str, str] = {}
        cpu_queues = [q for q in self.queues if q in cpu_levels]
        if not cpu_queues:
            self._hold_started = self._released_until = None
        held = bool(cpu_queues) and self._cpu_held(self.clock())
        for queue in self.queues:
            if memory and queue in self.memory_levels:
                # Memory is a hard limit: held for as long as it lasts (no release window).
                out[queue] = MEMORY
            elif held and queue in cpu_levels:
                out[queue] = CPU if queue in self.cpu_levels else CPU_CRITICAL
        return out

    def tick(self, consumer: Any, reading: Reading) -> None:
        wanted = self.wanted(reading)
        pause = [q for q in self._order if q in wanted]
        resume = [q for q in self.queues if q in self.reasons and q not in wanted]
        for queue in pause:
            consumer.cancel_task_queue(queue)
        current = [q for q in self._order if q not in wanted]
        if resume:
            # Celery appends a re-added queue after the ones it consumes; to keep the -Q order
            # the queues after the first misplaced one are cancelled and added again, in order.
            target = [q for q in self.queues if q in current or q in resume]
            keep = 0
            while keep < len(current) and current[keep] == target[keep]:
                keep += 1
            for queue in current[keep:]:
                consumer.cancel_task_queue(queue)
            for queue in target[keep:]:
                consumer.add_task_queue(queue)
            current = target
        self._order = current
        newly = {q: wanted[q] for q in pause}
        self.reasons = {q: wanted[q] for q in self.queues if q in wanted}
        bands = (self.memory.active, self.cpu.active, self.cpu_critical.active)
        # Pressure starting or ending is logged at WARNING; the CPU hold's release windows,
        # every few seconds while a neighbour keeps the CPU busy, at DEBUG.
        level = logging.WARNING if bands != self._bands else logging.DEBUG
        if bands != self._bands:
            self._bands = bands
            self.transitions += 1
        figures = (reading.memory_pct, reading.cpu_pct, reading.memory_source)
        if newly:
            log.log(
                level,
                "back-pressure: paused queues %s (memory %.1f%%, cpu %.1f%%, %s): %s",
                ",".join(newly),
                *figures,
                ", ".join(f"{q} for {r}" for q, r in newly.items()),
            )
        if resume:
            log.log(
                level,
                "back-pressure: resumed queues %s (memory %.1f%%, cpu %.1f%%, %s)",
                ",".join(resume),
                *figures,
            )


class GuardStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: heartbeat and (when guards are enabled) the back-pressure valve."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        guard = runtime_of(parent.app).guard
        if guard is None:
            return
        guard.on_consumer_start(parent)
        interval = guard.valve_interval_s
        if interval is not None:
            self.tref = parent.timer.call_repeatedly(
                interval, guard.valve_tick, (parent,), priority=10
            )

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
        guard = runtime_of(parent.app).guard
        if guard is not None:
            guard.on_consumer_shutdown()
