"""The example service with the overload handling that landed before CPU was scheduled.

For ``benchmarks/bench_overload.py`` only: the same app as ``examples.bdc`` (``-A`` finds ``app``
here), whose guard admits by memory *and CPU* as the landed design did: a task of a level whose
rule is ``warning``/``critical`` is re-published while CPU (everyone else's) is above that
threshold. The rest of the landed behaviour comes from settings the benchmark sets for this side:
no pool nice, no CPU pause of normal, a CPU pause of low/batch that is never released, a fixed
2-3 s deferral countdown, the reaper sent through beat every second, alerts without for/resolve.
"""

from __future__ import annotations

from typing import Any

from examples.bdc import app

from taskyard.runtime import runtime_of
from taskyard.workers.guards.guard import Guard
from taskyard.workers.guards.policy import REASON_MEMORY, Hold, Policy
from taskyard.workers.guards.readings import Reading

__all__ = ["app"]


class LandedPolicy(Policy):
    """Admission as it landed: memory or CPU above the level's threshold defers the task."""

    def hold(
        self, level: str, reading: Reading, requires_memory_mb: float | None = None
    ) -> Hold | None:
        held = super().hold(level, reading, requires_memory_mb)
        if held is not None:
            return held
        limits = self._limits.get(level, self._default)
        if level in self._never or (level not in self._limits and self._default_never):
            return None
        if reading.cpu_pct > limits[1]:
            # Counted under the memory reason: the landed design had no reasons.
            return Hold(REASON_MEMORY, f"cpu {reading.cpu_pct:.1f}% above {limits[1]:g}%")
        return None


def _install(target: Any) -> None:
    guard = runtime_of(target).guard
    if isinstance(guard, Guard):
        guard.policy = LandedPolicy(guard.settings, guard.default_level)


_install(app)
