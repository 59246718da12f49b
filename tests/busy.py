"""Another program keeping CPUs busy: one busy-loop process per requested core (for tests and
benchmarks of CPU pressure from outside the worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psutil

LOOP = "while True:\n    pass\n"


@contextmanager
def busy_loops(n: int = 2) -> Iterator[list[psutil.Process]]:
    """Start ``n`` busy-loop processes at the default priority; kill them on exit."""
    procs = [
        subprocess.Popen([sys.executable, "-c", LOOP], start_new_session=True) for _ in range(n)
    ]
    try:
        yield [psutil.Process(p.pid) for p in procs]
    finally:
        for p in procs:
            with suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU time of ``procs`` so far (s)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total
