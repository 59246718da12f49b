"""cgroup v2 limits and usage: the memory and CPU a containerised worker may really use.

Inside a container the host's totals say nothing about the limit the kernel enforces; the
cgroup's ``memory.max`` and ``cpu.max`` do. The effective limit is the smallest one on the path
from the process's cgroup up to the root of the mount, so a limit set on a parent counts too.
Parsing is separate from reading so the unit tests run on sample files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Where cgroup v2 is usually mounted (the unified hierarchy).
DEFAULT_MOUNT = Path("/sys/fs/cgroup")


def parse_memory_max(text: str) -> int | None:
    """Bytes from a ``memory.max`` file; None for ``max`` (no limit)."""
    value = text.strip()
    if not value or value == "max":
        return None
    limit = int(value)
    # Kernels report "no limit" on some setups as a page-rounded huge number.
    return None if limit >= 2**60 else limit


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a ``cpu.max`` file (``"quota period"``); None for ``max`` (no quota)."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    quota = int(parts[0])
    period = int(parts[1]) if len(parts) > 1 else 100_000
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_flat_keyed(text: str) -> dict[str, int]:
    """A flat keyed file (``memory.stat``, ``cpu.stat``): ``name value`` per line."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


def parse_proc_cgroup(text: str) -> str | None:
    """The v2 cgroup path of a process from ``/proc/<pid>/cgroup`` (the ``0::`` line)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def find_v2_mount(mounts_text: str) -> Path | None:
    """Mount point of the cgroup2 filesystem from ``/proc/self/mounts`` text."""
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return Path(parts[1])
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class CgroupV2:
    """The cgroup directories that bound this process: its own and those of its ancestors.

    ``memory_dir`` is the directory with the tightest ``memory.max`` (None: no memory limit);
    ``cpu_dir`` the one with the tightest ``cpu.max`` (None: no CPU quota).
    """

    memory_dir: Path | None
    memory_limit_bytes: int | None
    cpu_dir: Path | None
    cpus: float | None

    @classmethod
    def discover(cls, mount: Path | None = None, relative: str | None = None) -> CgroupV2 | None:
        """Find this process's limits; None when there is no cgroup v2 hierarchy to read."""
        if mount is None:
            mount = find_v2_mount(_read(Path("/proc/self/mounts")) or "")
            if mount is None and (DEFAULT_MOUNT / "cgroup.controllers").exists():
                mount = DEFAULT_MOUNT
        if mount is None:
            return None
        if relative is None:
            relative = parse_proc_cgroup(_read(Path("/proc/self/cgroup")) or "") or "/"
        leaf = mount / relative.lstrip("/")
        if not leaf.is_dir():
            # In a cgroup namespace the path may be relative to the namespace root (the mount).
            leaf = mount
        memory_dir: Path | None = None
        memory_limit: int | None = None
        cpu_dir: Path | None = None
        cpus: float | None = None
        directory = leaf
        while True:
            text = _read(directory / "memory.max")
            limit = parse_memory_max(text) if text is not None else None
            if limit is not None and (memory_limit is None or limit < memory_limit):
                memory_dir, memory_limit = directory, limit
            text = _read(directory / "cpu.max")
            quota = parse_cpu_max(text) if text is not None else None
            if quota is not None and (cpus is None or quota < cpus):
                cpu_dir, cpus = directory, quota
            if directory == mount or directory.parent == directory:
                break
            directory = directory.parent
        return cls(memory_dir, memory_limit, cpu_dir, cpus)

    @property
    def limited(self) -> bool:
        """Whether any memory limit or CPU quota applies."""
        return self.memory_dir is not None or self.cpu_dir is not None

    def memory_used_bytes(self) -> int | None:
        """Working set of the limiting cgroup: ``memory.current`` less reclaimable file cache.

        ``inactive_file`` is page cache the kernel drops before it would OOM-kill, so counting it
        would hold work back for memory that is in fact available (kubelet counts the same way).
        """
        if self.memory_dir is None:
            return None
        current = _read(self.memory_dir / "memory.current")
        if current is None:
            return None
        used = int(current.strip())
        stat = _read(self.memory_dir / "memory.stat")
        if stat is not None:
            used -= parse_flat_keyed(stat).get("inactive_file", 0)
        return max(used, 0)

    def cpu_usage_s(self) -> float | None:
        """CPU time used so far by every process of the limiting cgroup (s)."""
        if self.cpu_dir is None:
            return None
        stat = _read(self.cpu_dir / "cpu.stat")
        if stat is None:
            return None
        usage = parse_flat_keyed(stat).get("usage_usec")
        return None if usage is None else usage / 1e6


def host_cpu_count() -> int:
    """CPUs this process may run on (affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
