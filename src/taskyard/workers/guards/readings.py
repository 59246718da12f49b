"""Memory and CPU readings, kept current by a sampler thread so admission never measures.

A psutil call costs tens of microseconds; admission reads :attr:`Sampler.latest`, one attribute.
CPU is the busy share over a window of cumulative counters (never psutil's first
``cpu_percent(None)``, which is a meaningless 0.0). Under a cgroup v2 memory limit or CPU quota the
cgroup's figures are used, otherwise the host's.

CPU pressure leaves out the CPU this worker itself uses (its main process and pool children):
its concurrency already bounds that, and holding work back because the worker is busy with work
would only lower its own throughput. What remains is the load of everything else on the machine
or in the container (other workers, the database, other services), which is what lower-level
work should yield to. Memory is counted whole: a worker filling memory itself must stop too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import psutil

from taskyard.workers.guards.cgroup import CgroupV2, host_cpu_count

log = logging.getLogger("taskyard.guards")

MB = 1024 * 1024
#: How often the list of the worker's processes is refreshed (s); pool children change rarely.
FAMILY_REFRESH_S = 10.0
MemorySource = Literal["cgroup", "host"]


@dataclass(frozen=True, slots=True)
class Reading:
    """One snapshot of the resources this process competes for."""

    memory_pct: float
    memory_available_mb: float
    memory_total_mb: float
    memory_source: MemorySource
    cpu_pct: float
    #: When the snapshot was taken (s since the epoch).
    at: float
    #: Busy share of the whole host or cgroup, this worker included (percent): what host-level
    #: alerts report; ``cpu_pct`` (everyone else's load) is what admission and the valve use.
    host_cpu_pct: float = 0.0


#: What admission sees before the first sample: nothing is under pressure.
IDLE = Reading(0.0, float("inf"), float("inf"), "host", 0.0, 0.0)


class ReadingSource(Protocol):
    """Anything that hands out the current reading."""

    def current(self) -> Reading: ...


class MemoryReadings:
    """In-memory reading source for tests: readings are whatever the test sets."""

    def __init__(self, reading: Reading | None = None) -> None:
        self.latest = reading or Reading(10.0, 8000.0, 10000.0, "host", 5.0, time.time())

    def set(self, **changes: float | str) -> Reading:
        self.latest = replace(self.latest, **changes)  # type: ignore[arg-type]
        return self.latest

    def current(self) -> Reading:
        return self.latest


@dataclass(frozen=True, slots=True)
class Measurement:
    """Raw counters of one probe: memory now, cumulative CPU busy and capacity (s)."""

    memory_used_bytes: float
    memory_total_bytes: float
    memory_source: MemorySource
    cpu_busy_s: float
    cpu_capacity_s: float
    #: Busy time of everything, the worker's own processes included (s).
    cpu_total_busy_s: float | None = None


class Probe:
    """Reads the counters, from the cgroup when it limits this process, else from the host."""

    def __init__(
        self,
        prefer: Literal["auto", "cgroup", "host"] = "auto",
        cgroup: CgroupV2 | None = None,
        exclude_own_cpu: bool = True,
    ) -> None:
        self.prefer = prefer
        self._cgroup = cgroup
        self._discovered = cgroup is not None
        self._host_cpus = host_cpu_count()
        # Created in the worker's main process, before the pool forks: pool children inherit
        # this pid and so measure the same process tree.
        self._worker_pid = os.getpid() if exclude_own_cpu else None
        self._own_cpu_s: dict[int, float] = {}
        self._family: list[psutil.Process] = []
        self._family_at = -FAMILY_REFRESH_S

    def own_cpu_s(self) -> float:
        """CPU time (s) the worker's processes have used, cumulative and never decreasing.

        A pool child that exits takes its counter with it; keeping each pid's last figure keeps
        the total monotonic, so the window never sees the worker's own load as someone else's.
        """
        if self._worker_pid is None:
            return 0.0
        now = time.monotonic()
        if now - self._family_at > FAMILY_REFRESH_S:
            # Listing children scans every process of the machine: done rarely, not per sample.
            try:
                root = psutil.Process(self._worker_pid)
                self._family = [root, *root.children(recursive=True)]
                self._family_at = now
            except psutil.Error:
                return sum(self._own_cpu_s.values())
        for process in self._family:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            self._own_cpu_s[process.pid] = times.user + times.system
        return sum(self._own_cpu_s.values())

    @property
    def cgroup(self) -> CgroupV2 | None:
        if not self._discovered:
            self._discovered = True
            self._cgroup = None if self.prefer == "host" else CgroupV2.discover()
        return self._cgroup

    def measure(self) -> Measurement:
        cgroup = self.cgroup
        vm = psutil.virtual_memory()
        used, total = float(vm.total - vm.available), float(vm.total)
        source: MemorySource = "host"
        if cgroup is not None and cgroup.memory_limit_bytes is not None:
            cgroup_used = cgroup.memory_used_bytes()
            # A limit above the host's memory never binds; the host's figures say more.
            if cgroup_used is not None and cgroup.memory_limit_bytes < vm.total:
                used, total, source = float(cgroup_used), float(cgroup.memory_limit_bytes), "cgroup"
        now = time.monotonic()
        busy: float | None = None
        capacity = 0.0
        if cgroup is not None and cgroup.cpus is not None and cgroup.cpus < self._host_cpus:
            busy = cgroup.cpu_usage_s()
            capacity = now * cgroup.cpus
        if busy is None:
            times = psutil.cpu_times()
            idle = times.idle + getattr(times, "iowait", 0.0)
            capacity = sum(times)
            busy = capacity - idle
        return Measurement(used, total, source, busy - self.own_cpu_s(), capacity, busy)


class Sampler:
    """A daemon thread that refreshes :attr:`latest` every ``interval_s``.

    After a fork the thread is gone; :meth:`ensure_running` (called from ``worker_process_init``
    and lazily by admission) starts a new one. The CPU window is inherited across the fork, so a
    fresh pool child has a meaningful CPU figure from its first task on.
    """

    def __init__(self, probe: Probe, interval_s: float = 0.5, window_s: float = 5.0) -> None:
        self.probe = probe
        self.interval_s = interval_s
        self.window_s = window_s
        self.latest: Reading = IDLE
        self.hooks: list[Callable[[Reading], None]] = []
        self._window: deque[tuple[float, float, float, float]] = deque()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        _SAMPLERS.add(self)

    def current(self) -> Reading:
        return self.latest

    def sample(self) -> Reading:
        """Measure once and make the result :attr:`latest`."""
        m = self.probe.measure()
        now = time.monotonic()
        window = self._window
        total_busy = m.cpu_busy_s if m.cpu_total_busy_s is None else m.cpu_total_busy_s
        window.append((now, m.cpu_busy_s, m.cpu_capacity_s, total_busy))
        while len(window) > 2 and window[1][0] <= now - self.window_s:
            window.popleft()
        cpu = host_cpu = 0.0
        if len(window) >= 2:
            _, busy0, cap0, all0 = window[0]
            _, busy1, cap1, all1 = window[-1]
            if cap1 > cap0:
                cpu = min(100.0, max(0.0, 100.0 * (busy1 - busy0) / (cap1 - cap0)))
                host_cpu = min(100.0, max(0.0, 100.0 * (all1 - all0) / (cap1 - cap0)))
        total = m.memory_total_bytes
        used_pct = 100.0 * m.memory_used_bytes / total if total else 0.0
        self.latest = Reading(
            memory_pct=used_pct,
            memory_available_mb=max(0.0, (total - m.memory_used_bytes) / MB),
            memory_total_mb=total / MB,
            memory_source=m.memory_source,
            cpu_pct=cpu,
            at=time.time(),
            host_cpu_pct=host_cpu,
        )
        return self.latest

    @property
    def idle(self) -> bool:
        """No thread started in this process yet (cheap: one attribute)."""
        return self._thread is None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ensure_running(self) -> None:
        """Start the thread in this process unless it already runs."""
        if self.running:
            return
        with self._lock:
            if self.running:
                return
            self._stop.clear()
            try:
                self.sample()
            except Exception:  # a failed first sample must not stop the worker
                log.exception("resource sampler: first reading failed")
            self._thread = threading.Thread(target=self._run, name="taskyard-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * self.interval_s + 1)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                reading = self.sample()
            except Exception:  # keep the last reading, try again next period
                log.exception("resource sampler: reading failed")
                continue
            for hook in tuple(self.hooks):
                try:
                    hook(reading)
                except Exception:  # a hook never stops the sampler
                    log.exception("resource sampler: hook %r failed", hook)

    def _after_fork(self) -> None:
        self._thread = None
        self._stop = threading.Event()
        self._lock = threading.Lock()


_SAMPLERS: weakref.WeakSet[Sampler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for sampler in list(_SAMPLERS):
        sampler._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
