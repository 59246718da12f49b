"""Query helpers of the stats API: time bounds, ``?fields=`` selection, the response cache.

Bad parameters raise :class:`fastapi.exceptions.RequestValidationError`, so they reach the client
as the same 422 body FastAPI gives for its own checks, naming the parameter and the reason.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import math
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio.to_thread
from fastapi.exceptions import RequestValidationError

T = TypeVar("T")
log = logging.getLogger(__name__)


def invalid(parameter: str, value: Any, message: str) -> RequestValidationError:
    """A 422 error for query ``parameter`` in FastAPI's own error format."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", parameter), "msg": message, "input": value}]
    )


#: What a time bound may be, for error messages and parameter descriptions.
TIME_FORMS = "seconds since the epoch or an ISO 8601 timestamp (UTC if no zone)"


def epoch_seconds(value: str | float, *, naive_utc: bool = True) -> float:
    """Seconds since the epoch from ``value``: a number of seconds or an ISO 8601 timestamp.

    A timestamp without a zone is taken as UTC (``naive_utc=False``: as local time, for the
    command line, which prints local times).

    Raises:
        ValueError: ``value`` is neither, or lies outside the years 1 to 9999; the message
            names the value and the forms allowed.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                raise ValueError(
                    f"{value!r} is neither seconds since the epoch nor an ISO 8601 timestamp "
                    "(e.g. 1767225600 or 2026-01-01T00:00:00Z)"
                ) from None
            if moment.tzinfo is None and naive_utc:
                moment = moment.replace(tzinfo=UTC)
            try:
                seconds = moment.timestamp()
            except (OverflowError, OSError, ValueError):
                seconds = math.inf  # local time of a year the platform cannot convert
    # Years 0-9999 cover every timestamp a stats series can hold; beyond is a client error.
    if not math.isfinite(seconds) or not -62_135_596_800 <= seconds <= 253_402_300_799:
        raise ValueError(f"{value!r} is out of range (years 1 to 9999)")
    return seconds


def parse_time(parameter: str, value: str | None) -> float | None:
    """Seconds since the epoch from query ``parameter``'s ``value`` (see :func:`epoch_seconds`);
    None when it is absent or empty. Anything else is a 422 error naming the parameter."""
    if value is None or value == "":
        return None
    try:
        return epoch_seconds(value)
    except ValueError as exc:
        raise invalid(parameter, value, str(exc)) from None


def check_range(since: float | None, until: float | None) -> None:
    """Reject a time range whose start lies after its end."""
    if since is not None and until is not None and since > until:
        raise invalid("until", until, f"until ({until}) is before since ({since})")


def parse_fields(value: str | None, allowed: Iterable[str]) -> tuple[str, ...] | None:
    """The field names of ``?fields=a,b`` (in the order given), or None for all fields.

    Raises a 422 error naming each unknown field and the allowed ones.
    """
    if value is None:
        return None
    names = [part.strip() for part in value.split(",") if part.strip()]
    allowed_list = list(allowed)
    if not names:
        raise invalid(
            "fields",
            value,
            "fields is empty; give comma-separated names from: " + ", ".join(allowed_list),
        )
    unknown = [name for name in names if name not in allowed_list]
    if unknown:
        raise invalid(
            "fields",
            value,
            f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed_list)}",
        )
    return tuple(dict.fromkeys(names))


def select(rows: Sequence[Mapping[str, Any]], fields: tuple[str, ...] | None) -> list[Any]:
    """``rows`` reduced to ``fields`` (all of each row when None)."""
    if fields is None:
        return list(rows)
    return [{name: row.get(name) for name in fields} for row in rows]


@dataclass(frozen=True, slots=True)
class Body:
    """A response body, with its gzip form made once when it is worth compressing."""

    raw: bytes
    gzipped: bytes | None = None

    @classmethod
    def of(cls, raw: bytes, minimum_size: int = 500, level: int = 6) -> Body:
        return cls(raw, gzip.compress(raw, level) if len(raw) >= minimum_size else None)


class ResponseCache:
    """Per-process cache of computed responses: a short time to live, one computation at a time,
    stale-while-revalidate.

    Concurrent requests for a key that is being computed wait for that computation instead of
    starting their own, so a burst of scrapes costs one store read. Once an entry expires, the
    next request starts a refresh in the background and is answered with the expired value
    while it is at most ``stale_factor`` times the time to live old; older entries (and missing
    ones) are waited for. The computation runs in a worker thread: store reads are blocking
    Redis I/O and must not stall the event loop. Errors are never cached.
    """

    def __init__(
        self,
        ttl_s: float,
        max_entries: int = 256,
        clock: Callable[[], float] = time.monotonic,
        stale_factor: float = 3.0,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.stale_factor = stale_factor
        self._clock = clock
        self._entries: dict[Hashable, tuple[float, Any]] = {}
        self._inflight: dict[Hashable, asyncio.Future[Any]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    def clear(self) -> None:
        """Forget every cached response (after an admin action changed the data)."""
        self._entries.clear()

    async def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The cached value of ``key``, computing it in a thread when missing or expired."""
        if self.ttl_s > 0:
            entry = self._entries.get(key)
            if entry is not None:
                age = self._clock() - entry[0]
                if age < self.ttl_s:
                    return entry[1]  # type: ignore[no-any-return]
                if age < self.ttl_s * self.stale_factor:
                    if key not in self._inflight:
                        self._start(key, compute)
                    return entry[1]  # type: ignore[no-any-return]
        pending = self._inflight.get(key)
        if pending is None:
            pending = self._start(key, compute)
        # shield: a cancelled waiter must not cancel the computation others wait for.
        return await asyncio.shield(pending)

    def _start(self, key: Hashable, compute: Callable[[], Any]) -> asyncio.Future[Any]:
        # Registered before the task first runs, so every request of this loop iteration sees
        # the computation in flight and none starts another.
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        task = asyncio.create_task(self._run(key, compute, future))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return future

    async def _run(
        self, key: Hashable, compute: Callable[[], Any], future: asyncio.Future[Any]
    ) -> None:
        try:
            value = await anyio.to_thread.run_sync(compute)
        except Exception as exc:
            self._inflight.pop(key, None)
            log.debug("computing %r failed: %s", key, exc)
            future.set_exception(exc)
            future.exception()  # retrieved here: waiters get it raised; a refresh has none
            return
        except BaseException:
            self._inflight.pop(key, None)
            future.cancel()
            raise
        self._inflight.pop(key, None)
        if self.ttl_s > 0:
            self._store(key, value)
        future.set_result(value)

    def _store(self, key: Hashable, value: Any) -> None:
        now = self._clock()
        self._entries.pop(key, None)
        if len(self._entries) >= self.max_entries:
            keep = self.ttl_s * self.stale_factor
            self._entries = {k: v for k, v in self._entries.items() if now - v[0] < keep}
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (now, value)
