"""Per-task accounting (RSS growth, CPU time) and per-task limits, in each pool process.

A run is measured from ``before_start`` to ``after_return`` with two cheap reads (``statm`` through
a kept-open descriptor and ``time.process_time``), aggregated per task name in memory and merged
into one Redis hash at most every ``accounting_flush_interval_s`` by a Lua script (atomic, so the
pool processes of every worker add up without losing updates).

Limits (``memory_limit_mb``: growth of the process during the run; ``cpu_time_limit_s``) are
checked by the sampler thread; on a breach it signals the main thread, whose handler raises
:class:`~taskyard.errors.TaskMemoryLimitExceeded` or :class:`~taskyard.errors.TaskCpuLimitExceeded`
inside the task. The pool child is then retired (SIGTERM once idle) and the pool starts a fresh
one, as Celery does after a hard time limit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from taskyard.errors import ResourceGuardError, TaskCpuLimitExceeded, TaskMemoryLimitExceeded
from taskyard.lua import Script

log = logging.getLogger("taskyard.guards")

MB = 1024 * 1024
#: A run's RSS readings reuse one taken this recently (s). Reading ``statm`` is a system call
#: (a few µs, about 3 % of a no-op task's worker CPU for two); the process's growth is still
#: counted whole, by the run whose reading is fresh: runs shorter than this, one after another,
#: share readings (a run's start is its predecessor's end), so their sum still adds up.
RSS_READING_MAX_AGE_S = 0.005
#: Signal the sampler thread sends to the main thread to stop an over-limit task. SIGUSR1 is
#: billiard's soft time limit; SIGUSR2 is free in pool children.
LIMIT_SIGNAL = signal.SIGUSR2

#: Merges per-task deltas into the JSON values of one hash, atomically (``merge_resources.lua``).
MERGE = Script.from_file("taskyard.workers.guards", "merge_resources.lua")

SUM_FIELDS = ("runs", "cpu_s", "rss_growth_mb", "memory_limit_exceeded", "cpu_limit_exceeded")
MAX_FIELDS = ("cpu_max_s", "rss_growth_max_mb")


@dataclass
class _Aggregate:
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUM_FIELDS, 0.0))
    maxes: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MAX_FIELDS, 0.0))


class _Rss:
    """Resident set size of this process from /proc/self/statm (one pread, ~1 us)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._last = (-1.0, 0.0)  # (monotonic s, bytes) of the last reading
        _RSS_READERS.add(self)

    def recent(self) -> float:
        """The RSS, from the last reading when it is under :data:`RSS_READING_MAX_AGE_S` old."""
        now = time.monotonic()
        at, value = self._last
        if now - at < RSS_READING_MAX_AGE_S and at >= 0:
            return value
        value = self()
        self._last = (now, value)
        return value

    def __call__(self) -> float:
        fd = self._fd
        if fd is None:
            try:
                fd = self._fd = os.open("/proc/self/statm", os.O_RDONLY)
            except OSError:
                return _psutil_rss()
        return float(int(os.pread(fd, 128, 0).split()[1]) * self._page)

    def _after_fork(self) -> None:
        # /proc/self resolves when opened: the inherited descriptor reads the parent.
        self._last = (-1.0, 0.0)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


_RSS_READERS: weakref.WeakSet[_Rss] = weakref.WeakSet()


def _reset_rss_after_fork() -> None:
    for reader in list(_RSS_READERS):
        reader._after_fork()


os.register_at_fork(after_in_child=_reset_rss_after_fork)


def _psutil_rss() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss)


@dataclass(slots=True)
class _Run:
    name: str
    task_id: str
    rss0: float
    cpu0: float
    memory_limit_mb: float | None
    cpu_time_limit_s: float | None


class TaskMeter:
    """Measures task runs of this process, aggregates them and enforces per-task limits."""

    def __init__(
        self,
        redis_of: Callable[[], redis.Redis],
        key: str,
        flush_interval_s: float,
        counters_add: Callable[[int], None] | None = None,
    ) -> None:
        self._redis_of = redis_of
        self.key = key
        self.flush_interval_s = flush_interval_s
        self.rss = _Rss()
        self.current: _Run | None = None
        self.pending: dict[str, _Aggregate] = {}
        self._last_flush = time.monotonic()
        self._breach: ResourceGuardError | None = None
        self._breach_task: str | None = None
        self.retire = False
        self.enforce = False
        self.idle_since = time.monotonic()
        self._main_ident: int | None = None
        self._counters_add = counters_add

    # --- run boundaries (task thread) ------------------------------------------------------
    def start(self, task: Any, task_id: str) -> None:
        self.current = _Run(
            task.name,
            task_id,
            self.rss.recent(),
            time.process_time(),
            task.memory_limit_mb,
            task.cpu_time_limit_s,
        )

    def stop(self, failed: bool) -> None:
        run = self.current
        if run is None:
            return
        self.current = None
        self.idle_since = time.monotonic()
        growth_mb = max(0.0, (self.rss.recent() - run.rss0) / MB)
        cpu_s = max(0.0, time.process_time() - run.cpu0)
        agg = self.pending.get(run.name)
        if agg is None:
            agg = self.pending[run.name] = _Aggregate()
        sums, maxes = agg.sums, agg.maxes
        sums["runs"] += 1
        sums["cpu_s"] += cpu_s
        sums["rss_growth_mb"] += growth_mb
        if cpu_s > maxes["cpu_max_s"]:
            maxes["cpu_max_s"] = cpu_s
        if growth_mb > maxes["rss_growth_max_mb"]:
            maxes["rss_growth_max_mb"] = growth_mb
        breach = self._breach
        if breach is not None and self._breach_task == run.task_id:
            self._breach = None
            field_name = (
                "memory_limit_exceeded"
                if isinstance(breach, TaskMemoryLimitExceeded)
                else "cpu_limit_exceeded"
            )
            sums[field_name] += 1
            if self.enforce:
                # The process may hold on to what the task grew; a fresh child starts clean.
                self.retire = True
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    # --- Redis -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Write the pending aggregates (one Lua call); kept for the next try when Redis fails."""
        self._last_flush = time.monotonic()
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        argv: list[Any] = [time.time()]
        for name, agg in pending.items():
            argv.append(name)
            argv.append(json.dumps({"sum": agg.sums, "max": agg.maxes}))
        try:
            client = self._redis_of()
            MERGE(client, (self.key,), argv)
        except redis.RedisError as exc:
            log.warning("task accounting: flush to Redis failed (%s); kept for the next flush", exc)
            for name, agg in pending.items():
                mine = self.pending.setdefault(name, _Aggregate())
                for k, v in agg.sums.items():
                    mine.sums[k] += v
                for k, v in agg.maxes.items():
                    mine.maxes[k] = max(mine.maxes[k], v)

    # --- limits (sampler thread + signal handler) -----------------------------------------
    def install_enforcement(self) -> None:
        """Arm limit enforcement in this process (call from its main thread: pool children)."""
        self._main_ident = threading.main_thread().ident
        signal.signal(LIMIT_SIGNAL, self._on_signal)
        self.enforce = True

    def check_limits(self, _reading: object = None) -> None:
        """Sampler hook: stop the current run if it is over a limit; retire an idle process."""
        run = self.current
        if run is None:
            if self.retire and time.monotonic() - self.idle_since > 0.2:
                self.retire = False
                log.warning(
                    "pool process %d retired after a task exceeded its resource limit", os.getpid()
                )
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if self._breach is not None or not self.enforce or self._main_ident is None:
            return
        breach: ResourceGuardError | None = None
        if run.memory_limit_mb is not None:
            used_mb = (self.rss() - run.rss0) / MB
            if used_mb > run.memory_limit_mb:
                breach = TaskMemoryLimitExceeded(run.name, used_mb, run.memory_limit_mb)
        if breach is None and run.cpu_time_limit_s is not None:
            used_s = time.process_time() - run.cpu0
            if used_s > run.cpu_time_limit_s:
                breach = TaskCpuLimitExceeded(run.name, used_s, run.cpu_time_limit_s)
        if breach is None:
            return
        self._breach, self._breach_task = breach, run.task_id
        if self._counters_add is not None:
            self._counters_add(1)
        log.error("task %s[%s] stopped: %s", run.name, run.task_id, breach)
        signal.pthread_kill(self._main_ident, LIMIT_SIGNAL)

    def _on_signal(self, signum: int, frame: object) -> None:
        breach = self._breach
        run = self.current
        if breach is not None and run is not None and self._breach_task == run.task_id:
            raise breach
