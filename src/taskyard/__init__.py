"""taskyard: Celery task orchestration with priority queues, batching, guards and monitoring."""

from taskyard.app import create_app
from taskyard.errors import (
    BatchBufferFull,
    BatchError,
    BrokerUnavailable,
    ConfigurationError,
    ResourceGuardError,
    RoutingError,
    TaskArgumentError,
    TaskyardError,
)
from taskyard.routing import Priority, priority_task

__all__ = [
    "BatchBufferFull",
    "BatchError",
    "BrokerUnavailable",
    "ConfigurationError",
    "Priority",
    "ResourceGuardError",
    "RoutingError",
    "TaskArgumentError",
    "TaskyardError",
    "create_app",
    "priority_task",
]
