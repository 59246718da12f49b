"""The base task class of taskyard apps: level-aware sending with clear errors."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.canvas import Signature
from kombu.exceptions import ChannelError, EncodeError, OperationalError
from redis.exceptions import OutOfMemoryError

from taskyard.errors import OUT_OF_MEMORY, BrokerUnavailable, TaskArgumentError, out_of_memory
from taskyard.routing.levels import Priority, parse_level
from taskyard.runtime import find_runtime


class TaskyardTask(Task):  # type: ignore[misc]
    """Celery task with a priority level and per-task resource needs.

    Every task of an app made by :func:`taskyard.create_app` uses this class, so ``level=`` and
    :meth:`at` work on any of them, decorated with ``@priority_task`` or not.
    """

    #: Level the decorator gave this task; None lets routing rules decide.
    taskyard_level: Priority | None = None
    #: Memory (MB) that must be available before the task starts (resource guards).
    requires_memory_mb: float | None = None
    #: The task fails with TaskMemoryLimitExceeded when its process grows past this (MB).
    memory_limit_mb: float | None = None
    #: The task fails with TaskCpuLimitExceeded after using this much CPU time (s).
    cpu_time_limit_s: float | None = None
    #: Deliveries without an acknowledgement (each killed its process) before the message goes
    #: to the dead letters as "crashed"; None: TASKYARD_MAX_DELIVERIES.
    max_deliveries: int | None = None

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: Any = None,
        *,
        level: str | Priority | None = None,
        **options: Any,
    ) -> Any:
        """Send the task; ``level=`` sends this one call to another level's queue.

        Raises:
            RoutingError: ``level`` is not one of the five levels.
            TaskArgumentError: an argument cannot be encoded as JSON (nothing was sent).
            BrokerUnavailable: the broker stayed unreachable through the publish retries, or
                is out of memory (the reason names ``maxmemory``).
        """
        if level is not None:
            queue = parse_level(level).value
            options["queue"] = queue
            options["routing_key"] = queue
        try:
            if producer is None and link is None and link_error is None and shadow is None:
                destination = _named_queue(options)
                runtime = find_runtime(self._get_app()) if destination is not False else None
                publisher = runtime.publisher if runtime is not None else None
                if publisher is not None:
                    # The app's fast publisher, when it applies (None: it does not).
                    result = publisher.send(self, args, kwargs, task_id, destination)
                    if result is not None:
                        return result
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        except EncodeError as exc:
            raise TaskArgumentError(self.name, str(exc)) from exc
        except OperationalError as exc:
            broker = self.app.connection_for_write().as_uri()
            raise BrokerUnavailable(self.name, broker, str(exc)) from exc
        except (ChannelError, OutOfMemoryError) as exc:
            # A full Redis under noeviction: kombu's path raises ChannelError (the reply as its
            # cause), the fast publisher redis-py's error. Nothing was sent either way.
            if not out_of_memory(exc):
                raise
            broker = self.app.connection_for_write().as_uri()
            raise BrokerUnavailable(self.name, broker, f"{OUT_OF_MEMORY}: {exc}") from exc

    def at(self, level: str | Priority) -> Signature:
        """A signature that sends to ``level``: ``task.at("critical").delay(...)``."""
        queue = parse_level(level).value
        return self.signature(queue=queue, routing_key=queue)


def _named_queue(options: dict[str, Any]) -> str | bool | None:
    """The queue of a call whose only options name it; None without options, else False."""
    if not options:
        return None
    queue = options.get("queue")
    if (
        isinstance(queue, str)
        and options.get("routing_key", queue) == queue
        and len(options) == (2 if "routing_key" in options else 1)
    ):
        return queue
    return False
