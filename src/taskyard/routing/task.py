"""The base task class of taskyard apps: level-aware sending with clear errors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from celery import Task
from celery.canvas import Signature
from kombu.exceptions import ChannelError, EncodeError, OperationalError
from redis.exceptions import OutOfMemoryError

from taskyard.errors import (
    OUT_OF_MEMORY,
    BrokerUnavailable,
    TaskArgumentError,
    TaskDeduplicated,
    out_of_memory,
)
from taskyard.routing.jobs import unique_header
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
    #: Celery's strategy seam: on a solo pool (the fast profile) the lean execution path runs
    #: the task from the fetched message; elsewhere it returns Celery's default strategy.
    Strategy = "taskyard.workers.lean:strategy"
    #: Cluster-wide rate/concurrency limits and partition (taskyard.flow.FlowSpec), from the
    #: decorator's rate_limit=, concurrency=, partition_by=; None: none. Celery's own
    #: ``rate_limit`` (a per-worker token bucket) stays None on these tasks.
    taskyard_flow: Any = None
    #: Job control (docs/jobs.md): "queued" or "active" uniqueness, its key (argument names or
    #: a callable; None: every argument), a throttle window and a debounce delay (s).
    taskyard_unique: str | None = None
    taskyard_unique_key: Any = None
    taskyard_throttle: float | None = None
    taskyard_debounce: float | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        control = _job_control(self)
        if control is not None:
            # A message reserved before its cancel reached this worker: never started.
            control.check_before_run(self)
        return super().__call__(*args, **kwargs)

    def cancel_requested(self) -> bool:
        """Whether this running task was cancelled (``taskyard cancel``, the API, revoke): a
        long task checks it and returns early. Read from Redis at most every 0.1 s."""
        control = _job_control(self)
        return bool(control is not None and control.cancel_requested(self.request.id))

    def progress(self, done: float, total: float | None = None, detail: str | None = None) -> None:
        """Report progress (shown by ``taskyard task ID`` and ``/api/v1/tasks/{id}``, sent as a
        ``task-progress`` event); written at most every jobs.progress_interval_s, the last
        report always lands."""
        control = _job_control(self)
        if control is not None:
            control.progress(self, done, total, detail)

    def delay_many(self, calls: Iterable[Any], *, level: str | Priority | None = None) -> list[str]:
        """Send one task per positional-arguments tuple of ``calls``, pipelined: one script
        call per chunk (jobs.bulk_chunk). Returns the task ids in order (a deduplicated call
        gets its owner's id).

        Raises:
            BulkPublishError: an argument cannot be encoded; its chunk and the rest were not
                published, ``published`` says how many calls before them were.
        """
        return self.apply_many(((tuple(args), {}) for args in calls), level=level)

    def apply_many(
        self, calls: Iterable[tuple[Any, Any]], *, level: str | Priority | None = None
    ) -> list[str]:
        """As :meth:`delay_many`, for (args, kwargs) pairs."""
        runtime = find_runtime(self._get_app())
        control = runtime.jobs if runtime is not None else None
        queue = parse_level(level).value if level is not None else None
        if control is None or runtime is None:
            # Not on taskyard's Redis transport: one apply_async per call.
            return [self.apply_async(args, kwargs, level=level).id for args, kwargs in calls]
        settings = runtime.settings.jobs

        def lock(args: Any, kwargs: Any) -> list[Any] | None:
            return unique_header(self, args, kwargs, runtime.keys, settings.unique_ttl_s)

        ids: list[str] = control.send_many(self, calls, queue, lock)
        return ids

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

        The result's ``deduplicated`` attribute is True when a unique or throttled task's key
        was held by another message: nothing was published and the result is that message's
        (docs/jobs.md); False otherwise.

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
        extra: dict[str, Any] | None = None
        if self.taskyard_unique or self.taskyard_throttle or self.taskyard_debounce:
            runtime = find_runtime(self._get_app())
            if runtime is not None and runtime.jobs is not None:
                header = unique_header(
                    self, args, kwargs, runtime.keys, runtime.settings.jobs.unique_ttl_s
                )
                extra = {"taskyard_unique": header}
                if self.taskyard_debounce and "countdown" not in options and "eta" not in options:
                    options["countdown"] = self.taskyard_debounce
        try:
            result = _send(
                self, args, kwargs, task_id, producer, link, link_error, shadow, extra, options
            )
        except TaskDeduplicated as exc:
            result = self.AsyncResult(exc.owner_id)
            result.deduplicated = True
            return result
        if result is not None:  # Celery's apply_async returns None where a test replaced it
            result.deduplicated = False
        return result

    def at(self, level: str | Priority) -> Signature:
        """A signature that sends to ``level``: ``task.at("critical").delay(...)``."""
        queue = parse_level(level).value
        return self.signature(queue=queue, routing_key=queue)


def _job_control(task: TaskyardTask) -> Any:
    runtime = find_runtime(task._get_app())
    return runtime.jobs if runtime is not None else None


def _send(
    task: TaskyardTask,
    args: Any,
    kwargs: Any,
    task_id: str | None,
    producer: Any,
    link: Any,
    link_error: Any,
    shadow: Any,
    extra: dict[str, Any] | None,
    options: dict[str, Any],
) -> Any:
    """The fast publisher when it applies, else Celery's own ``apply_async``."""
    if extra:
        options["headers"] = {**(options.get("headers") or {}), **extra}
    try:
        if producer is None and link is None and link_error is None and shadow is None:
            destination = _named_queue(options, extra)
            runtime = find_runtime(task._get_app()) if destination is not False else None
            publisher = runtime.publisher if runtime is not None else None
            if publisher is not None and destination is not False:
                # The app's fast publisher, when it applies (None: it does not).
                result = publisher.send(task, args, kwargs, task_id, destination, extra)
                if result is not None:
                    return result
        return Task.apply_async(
            task, args, kwargs, task_id, producer, link, link_error, shadow, **options
        )
    except EncodeError as exc:
        raise TaskArgumentError(task.name, str(exc)) from exc
    except OperationalError as exc:
        broker = task.app.connection_for_write().as_uri()
        raise BrokerUnavailable(task.name, broker, str(exc)) from exc
    except (ChannelError, OutOfMemoryError) as exc:
        # A full Redis under noeviction: kombu's path raises ChannelError (the reply as its
        # cause), the fast publisher redis-py's error. Nothing was sent either way.
        if not out_of_memory(exc):
            raise
        broker = task.app.connection_for_write().as_uri()
        raise BrokerUnavailable(task.name, broker, f"{OUT_OF_MEMORY}: {exc}") from exc


def _named_queue(
    options: dict[str, Any], extra: dict[str, Any] | None = None
) -> str | Literal[False] | None:
    """The queue of a call whose only options name it; None without options, else False.

    ``extra``: taskyard's own headers, which the fast path adds itself.
    """
    if extra and options.get("headers") == extra:
        options = {k: v for k, v in options.items() if k != "headers"}
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


def _current() -> Any:
    from celery import current_task

    task = current_task._get_current_object() if current_task else None
    return task if isinstance(task, TaskyardTask) else None


def cancel_requested() -> bool:
    """Whether the taskyard task running in this thread was cancelled (False outside one)."""
    task = _current()
    return bool(task is not None and task.cancel_requested())


def progress(done: float, total: float | None = None, detail: str | None = None) -> None:
    """Report the running taskyard task's progress (see :meth:`TaskyardTask.progress`)."""
    task = _current()
    if task is not None:
        task.progress(done, total, detail)
