"""Worker profiles: named sets of queues, consumed in strict priority order."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from taskyard.config import Settings
from taskyard.errors import ConfigurationError
from taskyard.routing.levels import Priority, order_levels

log = logging.getLogger("taskyard.workers")


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    """A profile: its name and its queues, most urgent first."""

    name: str
    queues: tuple[Priority, ...]

    @property
    def queue_arg(self) -> str:
        """The ``-Q`` value: queues in strict priority order."""
        return ",".join(level.value for level in self.queues)

    @property
    def node_name(self) -> str:
        """Celery node name that says which profile a worker runs."""
        return f"{self.name}@%h"


def get_profile(settings: Settings, name: str) -> WorkerProfile:
    """The profile called ``name``.

    Raises:
        ConfigurationError: no such profile (the message lists the known ones).
        RoutingError: the profile lists an unknown queue.
    """
    try:
        queues = settings.worker_profiles[name]
    except KeyError:
        # "fast" is a way of running (solo processes over every queue), not a queue list.
        known = ", ".join(sorted({*settings.worker_profiles, "fast"}))
        raise ConfigurationError(
            f"unknown worker profile {name!r}; known profiles: {known}", value=name
        ) from None
    return WorkerProfile(name, tuple(order_levels(queues)))


#: Celery's switch (read once, when ``celery.utils.threads`` is imported) for the stacks that hold
#: the current task and each task's request: ``threading.local`` lists instead of Celery's own
#: greenlet-aware locals, whose push, pop and top go through ``__getattr__`` and a dict keyed by
#: thread or greenlet id. The tracer uses them several times per task: draining no-op tasks,
#: about 5 % less CPU per task on the ``fast`` profile and on prefork. Only green pools need
#: Celery's own (their tasks share a thread).
FAST_LOCALS = "USE_FAST_LOCALS"
#: Pools whose tasks run on greenlets sharing one thread.
GREEN_POOLS = frozenset({"eventlet", "gevent"})


def chosen_pool(args: Sequence[str]) -> str | None:
    """The pool that ``-P``/``--pool`` in ``args`` names (the last one wins), or None."""
    pool = None
    words = iter(args)
    for word in words:
        if word in ("-P", "--pool"):
            pool = next(words, None)
        elif word.startswith("--pool="):
            pool = word.split("=", 1)[1]
        elif word.startswith("-P") and len(word) > 2:
            pool = word[2:]
    return pool


def worker_env_additions(args: Sequence[str], base: Mapping[str, str]) -> dict[str, str]:
    """What a worker started with ``args`` adds to the environment ``base``: Celery's
    :data:`FAST_LOCALS` on, unless a green pool is chosen or ``base`` sets it already (an empty
    value turns it off)."""
    if FAST_LOCALS in base or chosen_pool(args) in GREEN_POOLS:
        return {}
    return {FAST_LOCALS: "1"}


def worker_environ(args: Sequence[str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker started with ``args``: ``base`` (this process's) with
    :func:`worker_env_additions`."""
    env = dict(os.environ if base is None else base)
    env.update(worker_env_additions(args, env))
    return env


def celery_worker_argv(app: str, profile: WorkerProfile, extra: tuple[str, ...] = ()) -> list[str]:
    """Arguments of the ``celery worker`` command that runs ``profile`` for ``app``."""
    argv = ["-A", app, "worker", "-Q", profile.queue_arg, "-n", profile.node_name, "-O", "fair"]
    return [*argv, *extra]


# --- the fast profile: several single-process consumers instead of a prefork pool ------------
#: Name of the profile that runs ``processes`` solo-pool workers on the queues of ``all``.
FAST = "fast"
#: Profile whose queues the fast profile consumes.
FAST_QUEUES_FROM = "all"
#: Pause before a fast-profile process that died is started again (s): bounds a crash loop's
#: pace; its reserved messages come back through the leases meanwhile.
RESTART_DELAY_S = 1.0


def fast_worker_argvs(
    app: str,
    profile: WorkerProfile,
    processes: int,
    extra: tuple[str, ...] = (),
    prefetch: int = 1,
) -> list[list[str]]:
    """``celery worker`` arguments of each process of the fast profile.

    Each process is a solo-pool worker (the task runs in the consumer's own process: no pool
    round trip, no result pipe), so the processes together use the cores a prefork pool would.
    Each reserves ``prefetch`` messages, so one fetch serves that many tasks; a
    ``--prefetch-multiplier`` in ``extra`` comes later on the command line and wins.
    """
    if processes < 1:
        raise ConfigurationError(
            f"the fast profile needs at least 1 process, got {processes}", value=processes
        )
    return [
        [
            "-A",
            app,
            "worker",
            "-Q",
            profile.queue_arg,
            "-P",
            "solo",
            "-c",
            "1",
            "-n",
            f"{FAST}{index}@%h",
            "--prefetch-multiplier",
            str(prefetch),
            *extra,
        ]
        for index in range(1, processes + 1)
    ]


def hard_time_limited_tasks(app: Any) -> list[str]:
    """Tasks of ``app`` with a hard time limit, which a solo pool cannot enforce."""
    default = app.conf.task_time_limit
    return sorted(
        name
        for name, task in app.tasks.items()
        if (getattr(task, "time_limit", None) or default) and not name.startswith("celery.")
    )


def split_processes(extra: tuple[str, ...], default: int) -> tuple[int, tuple[str, ...]]:
    """The ``-c N``/``--concurrency N`` of ``extra`` as the process count, and the rest."""
    rest: list[str] = []
    processes = default
    args = iter(extra)
    for arg in args:
        if arg in ("-c", "--concurrency"):
            value = next(args, "")
        elif arg.startswith("--concurrency="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
            continue
        try:
            processes = int(value)
        except ValueError:
            raise ConfigurationError(
                f"-c/--concurrency of the fast profile must be a whole "
                f"number of processes, got {value!r}",
                value=value,
            ) from None
    return processes, tuple(rest)


def run_processes(
    argvs: list[list[str]],
    *,
    restart_delay_s: float = RESTART_DELAY_S,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run each argv as a child in this process group (with ``env``, else this process's
    environment) until SIGTERM/SIGINT; returns 0.

    A child that exits on its own is started again after ``restart_delay_s``. The children
    share this process's group, so signalling the group reaches every one of them.
    """
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = threading.Event()

    def start(index: int) -> None:
        children[index] = subprocess.Popen(argvs[index], env=env)

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()
        for child in children.values():
            with suppress(ProcessLookupError):
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(len(argvs)):
            start(index)
        while not stopping.wait(0.2):
            for index, child in list(children.items()):
                if child.poll() is not None and not stopping.is_set():
                    log.warning(
                        "fast worker process %d exited with %s; starting it again",
                        index + 1,
                        child.returncode,
                    )
                    if not stopping.wait(restart_delay_s):
                        start(index)
        for child in children.values():
            child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def default_fast_processes(settings: Settings, cores: int | None = None) -> int:
    """Processes of the fast profile without ``-c``: ``fast_processes_per_core`` per core this
    process may run on, rounded up."""
    if cores is None:
        affinity = getattr(os, "sched_getaffinity", None)
        cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return max(1, math.ceil(settings.fast_processes_per_core * cores))


def launch_fast(
    app_path: str, settings: Settings, extra: tuple[str, ...] = (), processes: int | None = None
) -> int:
    """``taskyard worker --profile fast``: solo-pool processes, ``fast_processes_per_core`` per
    core by default (:func:`default_fast_processes`).

    Raises:
        ConfigurationError: a task of the app has a hard time limit (a solo pool cannot kill
            a task that overruns it), or the process count is not a positive number.
    """
    import sys

    from celery.app.utils import find_app

    count, rest = split_processes(extra, processes or default_fast_processes(settings))
    limited = hard_time_limited_tasks(find_app(app_path))
    if limited:
        raise ConfigurationError(
            "the fast profile runs tasks in solo-pool processes, which cannot enforce a hard "
            f"time limit; tasks with one: {', '.join(limited)}. Use a prefork profile for them",
            value=limited,
        )
    profile = get_profile(settings, FAST_QUEUES_FROM)
    argvs = [
        [sys.executable, "-m", "celery", *argv]
        for argv in fast_worker_argvs(
            app_path, profile, count, rest, prefetch=settings.fast_prefetch_multiplier
        )
    ]
    log.info("fast profile: %d solo processes on %s", count, profile.queue_arg)
    return run_processes(argvs, env=worker_environ(argvs[0]))
