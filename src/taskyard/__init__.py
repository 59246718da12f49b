"""taskyard: Celery task orchestration with priority queues, batching, guards and monitoring."""

from taskyard.app import create_app
from taskyard.batching import PartialFailure, batch_task
from taskyard.errors import (
    BatchBufferFull,
    BatchError,
    BatchItemError,
    BrokerUnavailable,
    ConfigurationError,
    ResourceGuardError,
    ResultsNotStored,
    RoutingError,
    TaskArgumentError,
    TaskyardError,
)
from taskyard.routing import Priority, priority_task
from taskyard.routing.task import cancel_requested, progress

__all__ = [
    "BatchBufferFull",
    "BatchError",
    "BatchItemError",
    "BrokerUnavailable",
    "ConfigurationError",
    "PartialFailure",
    "Priority",
    "ResourceGuardError",
    "ResultsNotStored",
    "RoutingError",
    "TaskArgumentError",
    "TaskyardError",
    "batch_task",
    "cancel_requested",
    "create_app",
    "priority_task",
    "progress",
]
