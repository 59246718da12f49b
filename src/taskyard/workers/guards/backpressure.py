"""Worker back-pressure: stop consuming the low and batch queues under load, with hysteresis.

Deferring a task costs a round trip to the broker; pausing the consumer of the pausable queues
means the worker does not pull that work at all while it is loaded. The worker pauses when memory
or CPU goes above its warning threshold and resumes only when both are below the lower resume
thresholds, so it does not flap around one value. The critical queue is never paused.

Runs in the worker's main process: :class:`GuardStep` is a consumer bootstep whose timer callback
runs in the consumer's own event loop, where ``cancel_task_queue``/``add_task_queue`` are safe.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from taskyard.workers.guards.readings import Reading

log = logging.getLogger("taskyard.guards")


class Hysteresis:
    """Pause above the warning thresholds; resume below the resume thresholds."""

    def __init__(self, memory_warning_pct: float, cpu_warning_pct: float,
                 memory_resume_pct: float, cpu_resume_pct: float) -> None:
        self.memory_warning_pct = memory_warning_pct
        self.cpu_warning_pct = cpu_warning_pct
        self.memory_resume_pct = memory_resume_pct
        self.cpu_resume_pct = cpu_resume_pct
        self.paused = False

    def update(self, reading: Reading) -> bool | None:
        """True when the consumers must pause now, False when they must resume, else None."""
        if not self.paused:
            if (reading.memory_pct > self.memory_warning_pct
                    or reading.cpu_pct > self.cpu_warning_pct):
                self.paused = True
                return True
            return None
        if reading.memory_pct < self.memory_resume_pct and reading.cpu_pct < self.cpu_resume_pct:
            self.paused = False
            return False
        return None


class Valve:
    """Applies the hysteresis to one consumer's pausable queues."""

    def __init__(self, hysteresis: Hysteresis, pausable: list[str]) -> None:
        self.hysteresis = hysteresis
        # Critical is never paused, whatever the settings say.
        self.pausable = [q for q in pausable if q != "critical"]
        self.queues: list[str] = []
        self.paused: list[str] = []
        self.transitions = 0

    def bind(self, queues: list[str]) -> None:
        """The queues the worker consumes (its -Q, in order), before any pause."""
        if not self.queues:
            self.queues = list(queues)

    def tick(self, consumer: Any, reading: Reading) -> None:
        change = self.hysteresis.update(reading)
        if change is True:
            targets = [q for q in self.queues if q in self.pausable and q not in self.paused]
            for queue in targets:
                consumer.cancel_task_queue(queue)
                self.paused.append(queue)
            self.transitions += 1
            log.warning("back-pressure: paused queues %s (memory %.1f%%, cpu %.1f%%, %s)",
                        ",".join(targets) or "-", reading.memory_pct, reading.cpu_pct,
                        reading.memory_source)
        elif change is False:
            resumed = [q for q in self.queues if q in self.paused]
            for queue in resumed:
                consumer.add_task_queue(queue)
            self.paused = []
            self.transitions += 1
            log.warning("back-pressure: resumed queues %s (memory %.1f%%, cpu %.1f%%, %s)",
                        ",".join(resumed) or "-", reading.memory_pct, reading.cpu_pct,
                        reading.memory_source)


class GuardStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: heartbeat and (when guards are enabled) the back-pressure valve."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        guard = getattr(parent.app, "_taskyard_guard", None)
        if guard is None:
            return
        guard.on_consumer_start(parent)
        if guard.valve is not None:
            self.tref = parent.timer.call_repeatedly(
                guard.settings.sample_interval_s, guard.valve_tick, (parent,), priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
        guard = getattr(parent.app, "_taskyard_guard", None)
        if guard is not None:
            guard.on_consumer_shutdown()
