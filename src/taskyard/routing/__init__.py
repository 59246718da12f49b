"""Priority levels, routing rules and ``@priority_task``."""

from taskyard.routing.decorator import priority_task
from taskyard.routing.levels import LEVEL_NAMES, LEVELS, Priority, build_queues, parse_level
from taskyard.routing.rules import CompiledRule, Router
from taskyard.routing.task import TaskyardTask

__all__ = [
    "LEVELS",
    "LEVEL_NAMES",
    "CompiledRule",
    "Priority",
    "Router",
    "TaskyardTask",
    "build_queues",
    "parse_level",
    "priority_task",
]
