"""taskyard's own signals, for events Celery has no signal for.

Monitoring subscribes to these the way it subscribes to Celery's; senders never depend on a
receiver, and a failing receiver is logged, never fatal (Celery's ``send`` catches and logs).
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

#: A resource guard held a task back and re-queued it.
#: sender: task name; kwargs: task_id, level, reason, deferrals (count so far).
task_deferred = Signal(
    name="taskyard.task_deferred", providing_args={"task_id", "level", "reason", "deferrals"}
)

#: A batch was claimed for processing.
#: sender: batch name; kwargs: group, batch_id, size, reason ("size" or "age").
batch_flushed = Signal(
    name="taskyard.batch_flushed", providing_args={"group", "batch_id", "size", "reason"}
)

#: A task (or a message that is not one) went to the dead-letter store.
#: sender: task name ("-" when unknown); kwargs: task_id, reason (failed, crashed, poison,
#: expired), queue, detail.
task_dead = Signal(
    name="taskyard.task_dead", providing_args={"task_id", "reason", "queue", "detail"}
)
