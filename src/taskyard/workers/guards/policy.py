"""Admission decisions: does a task of this level run now, given the current memory reading?

Admission is about memory only. CPU pressure never re-publishes a task: a CPU-bound host still
makes progress, so lower levels are held back at the source instead (their consumers paused, see
:mod:`.backpressure`) and low/batch workers run at a lower OS priority. Re-publishing a fetched
task costs a broker round trip and CPU on work that is not being done, and under a neighbour
that keeps the CPU busy the same task would come back and be deferred again and again.

Each level has a rule (``GuardSettings.level_policy``); for admission the rules read memory:

``never``            always runs (critical work, also ignores ``requires_memory_mb``)
``warning``          held while memory is above its warning threshold
``critical``         held while memory is above its critical threshold
``memory_warning``   the same as ``warning``
``memory_critical``  the same as ``critical``

A task with ``requires_memory_mb`` is also held until that much memory is available. The rules are
turned into limits per level once, so a decision is two comparisons. (The CPU limit of a rule is
kept beside the memory one for readers of the policy, such as the overload benchmark's model of
the landed design; admission does not use it.)
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from taskyard.config import GuardSettings
from taskyard.errors import ConfigurationError
from taskyard.routing.levels import LEVEL_NAMES
from taskyard.workers.guards.readings import Reading

INF = float("inf")
RULES = ("never", "warning", "critical", "memory_warning", "memory_critical")
LEVELS = LEVEL_NAMES
#: Why a task was deferred, as counted per reason in heartbeats, the stats API and /metrics.
REASON_MEMORY = "memory"
REASON_REQUIRES_MEMORY = "requires_memory"
REASONS = (REASON_MEMORY, REASON_REQUIRES_MEMORY)


class Hold(NamedTuple):
    """Why a task must wait: the reason kind (``REASONS``) and a readable text."""

    kind: str
    text: str


class Pressure(IntEnum):
    """How loaded the machine (or container) is, by the worst of memory and CPU."""

    OK = 0
    WARNING = 1
    CRITICAL = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class Policy:
    """Thresholds and per-level rules, precomputed for cheap decisions."""

    def __init__(self, settings: GuardSettings, default_level: str = "normal") -> None:
        self.settings = settings
        self.memory_warning = settings.memory_warning_pct
        self.memory_critical = settings.memory_critical_pct
        self.cpu_warning = settings.cpu_warning_pct
        self.cpu_critical = settings.cpu_critical_pct
        self._limits: dict[str, tuple[float, float]] = {}
        self._never: set[str] = set()
        for level, rule in settings.level_policy.items():
            if level not in LEVELS:
                raise ConfigurationError(
                    f"TASKYARD_GUARD__LEVEL_POLICY names unknown level {level!r}; "
                    f"valid levels are: {', '.join(LEVELS)}",
                    setting="TASKYARD_GUARD__LEVEL_POLICY",
                    value=level,
                )
            self._limits[level] = self._limits_of(rule)
            if rule == "never":
                self._never.add(level)
        # Levels the settings leave out, and foreign queues, follow the default level's rule.
        self._default = self._limits.get(default_level, self._limits_of("warning"))
        self._default_never = default_level in self._never

    def _limits_of(self, rule: str) -> tuple[float, float]:
        if rule == "never":
            return INF, INF
        if rule == "warning":
            return self.memory_warning, self.cpu_warning
        if rule == "critical":
            return self.memory_critical, self.cpu_critical
        if rule == "memory_warning":
            return self.memory_warning, INF
        if rule == "memory_critical":
            return self.memory_critical, INF
        raise ConfigurationError(
            f"TASKYARD_GUARD__LEVEL_POLICY rule {rule!r} is unknown; valid rules: "
            f"{', '.join(RULES)}",
            setting="TASKYARD_GUARD__LEVEL_POLICY",
            value=rule,
        )

    def pressure(self, reading: Reading) -> Pressure:
        """The worst level reached by memory or CPU (thresholds are exceeded strictly above)."""
        if reading.memory_pct > self.memory_critical or reading.cpu_pct > self.cpu_critical:
            return Pressure.CRITICAL
        if reading.memory_pct > self.memory_warning or reading.cpu_pct > self.cpu_warning:
            return Pressure.WARNING
        return Pressure.OK

    def hold(
        self, level: str, reading: Reading, requires_memory_mb: float | None = None
    ) -> Hold | None:
        """None when a task of ``level`` may start now, else why it must wait (memory only)."""
        limits = self._limits.get(level)
        if limits is None:
            limits = self._default
            if self._default_never:
                return None
        elif level in self._never:
            return None
        memory_limit = limits[0]
        if reading.memory_pct > memory_limit:
            return Hold(REASON_MEMORY, f"memory {reading.memory_pct:.1f}% above {memory_limit:g}%")
        if requires_memory_mb is not None and reading.memory_available_mb < requires_memory_mb:
            return Hold(
                REASON_REQUIRES_MEMORY,
                f"needs {requires_memory_mb:g} MB, {reading.memory_available_mb:.0f} MB available",
            )
        return None

    def check(
        self, level: str, reading: Reading, requires_memory_mb: float | None = None
    ) -> str | None:
        """The text of :meth:`hold` (None: may start now)."""
        held = self.hold(level, reading, requires_memory_mb)
        return None if held is None else held.text
