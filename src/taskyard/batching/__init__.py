"""Batching: ``@batch_task`` buffers small items in Redis and hands them to one task as a list.

Buffers, claims and leases are Lua scripts (``*.lua`` beside :mod:`~taskyard.batching.buffer`);
the flush task runs on the workers (:mod:`~taskyard.batching.flush`); the reaper flushes aged
buffers and republishes batches of crashed workers (:mod:`~taskyard.batching.reaper`);
:func:`inspect_batches` and ``taskyard batches`` show it all.
"""

from taskyard.batching.decorator import BatchTask, batch_task
from taskyard.batching.definition import AddResult, BatchDefinition
from taskyard.batching.inspect import inspect_batches, list_dead, purge_dead, requeue_dead
from taskyard.batching.install import install
from taskyard.batching.reaper import REAP_TASK, reap
from taskyard.errors import PartialFailure

__all__ = [
    "REAP_TASK",
    "AddResult",
    "BatchDefinition",
    "BatchTask",
    "PartialFailure",
    "batch_task",
    "inspect_batches",
    "install",
    "list_dead",
    "purge_dead",
    "reap",
    "requeue_dead",
]
