"""Typed rows from the stats store to the pages: the JSON API's models, and the thresholds
the charts draw.

The store answers the JSON API's shapes (``dict`` rows); each page validates them into the
models of :mod:`taskyard.monitoring.api.models` once, here, so templates read typed fields and
one name per field (``in_flight_items``, as the API names it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

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
