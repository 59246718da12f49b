"""Helpers for tests and benchmarks: real `celery worker` processes with bounded waits, the CPU
time of process trees, busy loops standing for another program's CPU load.

Not used by the platform itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

from taskyard.devstack.supervisor import die_with_parent, free_ports

#: Project checkout the worker runs in (so test and example apps import).
ROOT = Path.cwd()


def wait_until(
    predicate: Callable[[], object],
    timeout_s: float,
    interval_s: float = 0.05,
    message: str = "condition",
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {message}")
        time.sleep(interval_s)


def terminate(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM ``process``, wait up to ``timeout_s``, then SIGKILL it."""
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKYARD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run_python(env: Mapping[str, str], code: str, timeout_s: float = 120.0) -> None:
    """Run ``code`` in a fresh interpreter of this checkout with ``env`` (e.g. to send tasks
    from a process of their own); raises if it fails."""
    subprocess.run(
        [sys.executable, "-c", code], env=child_env(env), cwd=ROOT, check=True, timeout=timeout_s
    )


def process_tree(pid: int) -> list[psutil.Process]:
    """Process ``pid`` and its descendants now ([] when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def cpu_seconds(procs: Sequence[psutil.Process]) -> float:
    """User + system CPU time of ``procs`` so far (s); a process that is gone counts nothing."""
    total = 0.0
    for proc in procs:
        with suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def tree_cpu_s(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its descendants so far (s)."""
    return cpu_seconds(process_tree(pid))


#: The program of :func:`busy_loops`.
BUSY_LOOP = "while True:\n    pass\n"


@contextmanager
def busy_loops(n: int = 2) -> Iterator[list[psutil.Process]]:
    """Another program keeping CPUs busy: ``n`` busy-loop processes at the default priority,
    each in its own session (as an unrelated service would be); killed on exit."""
    procs = [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP], start_new_session=True)
        for _ in range(n)
    ]
    try:
        yield [psutil.Process(p.pid) for p in procs]
    finally:
        for p in procs:
            with suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def worker_argv(
    app: str,
    queues: str,
    *,
    concurrency: int = 2,
    name: str = "test",
    pool: str = "prefork",
    loglevel: str = "INFO",
    extra: Sequence[str] = (),
    prefix: Sequence[str] = (),
) -> list[str]:
    """``celery -A app worker -Q queues`` as tests and benchmarks run it: this interpreter, the
    node ``name@%h``, no gossip or mingle (nothing to learn from other workers in a test)."""
    return [
        *prefix,
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "-P",
        pool,
        "-n",
        f"{name}@%h",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        *extra,
    ]


def spawn(
    argv: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own (stop it with :func:`os.killpg`), with
    :func:`child_env` of ``env``, output to ``log``; it dies with this process."""
    with log.open("wb") as sink:
        return subprocess.Popen(
            list(argv),
            env=child_env(env),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
            preexec_fn=die_with_parent,
        )


def monitoring_ports_env() -> dict[str, str]:
    """Two distinct free ports for a test stack's Flower and stats API, as its environment."""
    flower, api = free_ports(2)
    return {
        "TASKYARD_MONITORING__FLOWER_PORT": str(flower),
        "TASKYARD_MONITORING__API_PORT": str(api),
    }


def start_up(
    app: str, directory: Path, env: Mapping[str, str], *options: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """``taskyard up -A app *options`` run in ``directory`` (where it writes its stack file) with
    :func:`child_env` of ``env``; output to ``directory/up.log``, which is returned with the
    process. Not in a session of its own: it is stopped by signalling it, as Ctrl-C would.

    Flower and the stats API get ports of their own (unless ``env`` names them): two stacks
    started at once on the default ports would both find them free, and one would lose."""
    log = directory / "up.log"
    own = {**monitoring_ports_env(), **env}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "taskyard.cli", "up", "-A", app, *options],
            env=child_env(own),
            cwd=directory,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return process, log


def wait_started(process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> str:
    """Wait until ``taskyard up`` printed how to stop it (Ctrl-C); its output so far.

    Raises:
        AssertionError: it exited instead (with its output), or did not start in time.
    """
    wait_until(
        lambda: "Ctrl-C" in log.read_text(errors="replace") or process.poll() is not None,
        timeout_s,
        0.2,
        "the stack to start",
    )
    text = log.read_text(errors="replace")
    assert process.poll() is None, text
    return text


class Worker:
    """A running celery worker process (its own process group)."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.pid, sig)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(5)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the worker as an operator does: SIGTERM to its main process only (Celery's warm
        shutdown finishes and acknowledges what its pool processes run), then, after
        ``timeout_s``, SIGKILL to the whole group. A SIGTERM to the group would end the pool
        processes before their worker acknowledged what they had finished, and those tasks run
        again on the next worker."""
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(5)


@contextmanager
def celery_worker(
    app: str,
    queues: str,
    env: Mapping[str, str],
    log_dir: Path,
    *,
    concurrency: int = 2,
    name: str = "test",
    pool: str = "prefork",
    extra: tuple[str, ...] = (),
    ready_timeout_s: float = 30.0,
    prefix: Sequence[str] = (),
) -> Iterator[Worker]:
    """Start ``celery -A app worker -Q queues``; wait until it is ready; stop it afterwards.

    ``prefix`` runs the worker through another program, e.g. ``ip netns exec HOST``.
    """
    log = log_dir / f"worker-{name}-{time.monotonic_ns()}.log"
    argv = worker_argv(
        app, queues, concurrency=concurrency, name=name, pool=pool, extra=extra, prefix=prefix
    )
    process = spawn(argv, env, log)
    worker = Worker(process, log)
    try:
        wait_until(
            lambda: " ready." in worker.output() or process.poll() is not None,
            ready_timeout_s,
            0.1,
            f"worker {name} to be ready",
        )
        if process.poll() is not None:
            raise AssertionError(f"worker {name} exited:\n{worker.output()[-3000:]}")
        yield worker
    finally:
        worker.stop()
