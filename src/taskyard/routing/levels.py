"""The five priority levels and the kombu queues that carry them."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from kombu.entity import Exchange, Queue

from taskyard.errors import RoutingError


class Priority(StrEnum):
    """A priority level; its value is also the name of its queue."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"
    BATCH = "batch"


#: Levels from most to least urgent: the order a worker consuming several queues polls them.
LEVELS: tuple[Priority, ...] = tuple(Priority)
LEVEL_NAMES: tuple[str, ...] = tuple(level.value for level in LEVELS)


def parse_level(value: Any, *, where: str = "priority level") -> Priority:
    """Return the level named by ``value`` (a :class:`Priority` or its name, any case).

    Raises:
        RoutingError: ``value`` names none of the five levels.
    """
    if isinstance(value, Priority):
        return value
    if isinstance(value, str):
        try:
            return Priority(value.strip().lower())
        except ValueError:
            pass
    raise RoutingError(value, LEVEL_NAMES, where=where)


def order_levels(values: list[str] | tuple[str, ...]) -> list[Priority]:
    """Parse level names and sort them most urgent first, dropping duplicates."""
    levels = {parse_level(value) for value in values}
    return [level for level in LEVELS if level in levels]


def build_queues() -> tuple[Queue, ...]:
    """One durable direct queue per level, routing key = queue name."""
    exchange = Exchange("taskyard", type="direct", durable=True)
    return tuple(Queue(level.value, exchange, routing_key=level.value) for level in LEVELS)
