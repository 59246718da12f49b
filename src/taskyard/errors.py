"""The one exception hierarchy of taskyard.

Every error a caller can see derives from :class:`TaskyardError`. Each carries the offending value
as a typed attribute so callers and tests can inspect it without parsing the message.
"""

from __future__ import annotations

from collections.abc import Iterable
from difflib import get_close_matches
from typing import Any


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""`` when none is close."""
    close = get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class TaskyardError(Exception):
    """Base class of every taskyard error."""


class ConfigurationError(TaskyardError):
    """A setting or decorator option has a value that taskyard cannot use."""

    def __init__(self, message: str, *, setting: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.setting = setting
        self.value = value


class RoutingError(ConfigurationError):
    """A priority level, queue or routing rule is unknown or malformed."""

    def __init__(self, value: Any, valid: Iterable[str], *, where: str = "priority level") -> None:
        self.valid = tuple(valid)
        super().__init__(
            f"unknown {where} {value!r}; valid levels are: {', '.join(self.valid)}",
            value=value,
        )


class EnqueueError(TaskyardError):
    """A task could not be sent; nothing was published."""


class TaskArgumentError(EnqueueError):
    """A task argument cannot be encoded as JSON."""

    def __init__(self, task_name: str, reason: str) -> None:
        super().__init__(f"cannot send {task_name}: arguments are not JSON-encodable ({reason})")
        self.task_name = task_name
        self.reason = reason


class BrokerUnavailable(EnqueueError):
    """The broker could not be reached within the configured publish retries."""

    def __init__(self, task_name: str, broker: str, reason: str) -> None:
        super().__init__(f"cannot send {task_name}: broker {broker} unreachable ({reason})")
        self.task_name = task_name
        self.broker = broker
        self.reason = reason


class TaskDeduplicated(EnqueueError):
    """A unique or throttled task's key is held by another message: nothing was published.

    Raised inside the publish path only; ``apply_async`` turns it into the owner's result.
    """

    def __init__(self, task_name: str, owner_id: str, mode: str) -> None:
        super().__init__(f"{task_name}: key held by task {owner_id} ({mode}); nothing published")
        self.task_name = task_name
        self.owner_id = owner_id
        self.mode = mode


class BulkPublishError(TaskArgumentError):
    """A chunk of ``delay_many``/``apply_many`` was refused before any of it was published."""

    def __init__(self, task_name: str, reason: str, *, published: int, index: int) -> None:
        super().__init__(
            task_name,
            f"call #{index} refused ({reason}); {published} call(s) before its chunk were "
            "published, none of its chunk or after it",
        )
        self.published = published
        self.index = index


#: The reason a refused write gives when Redis is full: the setting and the fixes.
OUT_OF_MEMORY = (
    "out of memory: Redis is above its maxmemory and refuses writes (maxmemory-policy "
    "noeviction); raise maxmemory, free memory or move the cache to another Redis"
)


def out_of_memory(exc: BaseException) -> bool:
    """True when ``exc``, or an error it was raised from, is Redis refusing a write at maxmemory.

    kombu turns the reply into its ``ChannelError``, keeping redis-py's ``OutOfMemoryError`` as
    the cause; the reply text is Redis' own ("... used memory > 'maxmemory'").
    """
    seen: BaseException | None = exc
    for _ in range(8):  # a chain, not a cycle
        if seen is None:
            return False
        if type(seen).__name__ == "OutOfMemoryError" or "> 'maxmemory'" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class BatchError(TaskyardError):
    """A batch buffer operation failed."""


class BufferUnavailable(BrokerUnavailable, BatchError):
    """Redis, which holds the batch buffers, could not be reached; the items are not accepted."""

    def __init__(self, batch_name: str, redis_url: str, reason: str) -> None:
        TaskyardError.__init__(
            self,
            f"cannot buffer items of batch {batch_name!r}: Redis {redis_url} unreachable "
            f"({reason}); the items were not accepted",
        )
        self.task_name = batch_name
        self.batch_name = batch_name
        self.broker = redis_url
        self.reason = reason


class BatchBufferFull(BatchError):
    """A batch buffer already holds its ``max_buffered`` items; the item was not accepted."""

    def __init__(
        self,
        batch_name: str,
        buffered: int,
        limit: int,
        *,
        accepted: int = 0,
        rejected: tuple[int, ...] = (),
    ) -> None:
        tail = (
            f"; {accepted} items of this call were accepted, {len(rejected)} not"
            if accepted
            else "; item not accepted"
        )
        super().__init__(
            f"batch {batch_name!r} holds {buffered} items, its limit max_buffered={limit}{tail}"
        )
        self.batch_name = batch_name
        self.buffered = buffered
        self.limit = limit
        #: add_many: how many items of the call were accepted, and the indices of the others.
        self.accepted = accepted
        self.rejected = rejected


class BatchItemError(BatchError):
    """A batch item is not JSON-encodable or exceeds the item size limit."""

    def __init__(self, batch_name: str, message: str, *, item_type: str, size: int | None = None):
        super().__init__(f"batch {batch_name!r}: {message}")
        self.batch_name = batch_name
        self.item_type = item_type
        self.size = size


class PartialFailure(BatchError):
    """Raised or returned by a batch function: the items at ``failed`` (indices) failed."""

    def __init__(self, failed: Iterable[int], reason: str = "") -> None:
        self.failed = tuple(sorted({int(i) for i in failed}))
        self.reason = reason
        super().__init__(
            f"{len(self.failed)} items of the batch failed" + (f": {reason}" if reason else "")
        )


class ResourceGuardError(TaskyardError):
    """A resource guard stopped or refused a task."""


class TaskMemoryLimitExceeded(ResourceGuardError):
    """A task grew its process memory beyond its ``memory_limit_mb``."""

    def __init__(self, task_name: str, used_mb: float, limit_mb: float) -> None:
        super().__init__(
            f"task {task_name} used {used_mb:.0f} MB of memory, over its limit of {limit_mb:.0f} MB"
        )
        self.task_name = task_name
        self.used_mb = used_mb
        self.limit_mb = limit_mb

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its attributes, so a pool child's failure keeps its class (Celery pickles).
        return type(self), (self.task_name, self.used_mb, self.limit_mb)


class TaskCpuLimitExceeded(ResourceGuardError):
    """A task used more CPU time than its ``cpu_time_limit_s``."""

    def __init__(self, task_name: str, used_s: float, limit_s: float) -> None:
        super().__init__(
            f"task {task_name} used {used_s:.2f} s of CPU time, over its limit of {limit_s:.2f} s"
        )
        self.task_name = task_name
        self.used_s = used_s
        self.limit_s = limit_s

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.task_name, self.used_s, self.limit_s)


class MaintenanceError(TaskyardError):
    """A database maintenance step failed."""


class CacheError(TaskyardError):
    """A cache operation was given a value it cannot store."""


class DeadLetterError(TaskyardError):
    """A dead-letter entry is unknown, or a search or replay was given a value it cannot use."""

    def __init__(self, message: str, *, value: Any = None) -> None:
        super().__init__(message)
        self.value = value


class UserError(TaskyardError):
    """A user name, role, password or token was refused, or the user is unknown."""

    def __init__(self, message: str, *, value: Any = None) -> None:
        super().__init__(message)
        self.value = value


class ResultsNotStored(TaskyardError):
    """A task's result or state was asked for, and no result backend is configured."""
