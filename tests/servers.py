"""Where the real servers of the test suite are, and how a test asks for one.

A test that needs a server calls :func:`require`: when the server does not answer, the test is
skipped locally with the reason, and fails when ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field

import pytest
import redis

from taskyard.testing import terminate, wait_until

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def _redis_db() -> int:
    """``TASKYARD_TEST_REDIS_DB`` (9 by default) for a plain run; under pytest-xdist each worker
    (``PYTEST_XDIST_WORKER`` = gw0, gw1, ...) takes that number plus its index, so parallel
    workers never flush each other's keys. A comma-separated list (``13,15``) names each
    worker's database instead, for a shared server where the next numbers belong to others."""
    setting = os.environ.get("TASKYARD_TEST_REDIS_DB", "9")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker.startswith("gw") else 0
    if "," in setting:
        databases = [int(db) for db in setting.split(",")]
        if index >= len(databases):
            raise RuntimeError(
                f"TASKYARD_TEST_REDIS_DB={setting} names {len(databases)} databases for "
                f"xdist worker {worker}: name one per worker"
            )
        return databases[index]
    return int(setting) + index


#: Database this test process owns; flushed around each test (never FLUSHALL).
REDIS_DB = _redis_db()
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
POSTGRES_URL = os.environ.get(
    "TASKYARD_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
RABBITMQ_URL = os.environ.get("TASKYARD_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")

_PORTS = {"redis": REDIS_PORT, "postgresql": 5432, "rabbitmq": 5672}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require(server: str) -> None:
    """Skip (locally) or fail (in CI) the calling test when ``server`` does not answer."""
    port = _PORTS[server]
    if answers(port):
        return
    reason = f"{server} is not answering on 127.0.0.1:{port} (run scripts/ensure-services.sh)"
    if in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


def require_program(name: str, hint: str = "scripts/ensure-services.sh") -> str:
    """The path of program ``name``; skips (locally) or fails (in CI) the calling test when it
    is not installed."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not installed (run {hint})"
    if in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


def purge_rabbitmq() -> None:
    """Empty the five level queues on the suite's RabbitMQ (they outlive a test run)."""
    from kombu import Connection

    from taskyard.routing import LEVEL_NAMES

    with Connection(RABBITMQ_URL) as conn:
        channel = conn.channel()
        for name in LEVEL_NAMES:
            try:
                channel.queue_purge(name)
            except Exception:  # a queue not declared yet has nothing to purge
                channel = conn.channel()


@dataclass
class RedisServer:
    """A ``redis-server`` of a test's own on a spare port, for what the shared server must not
    see (SCRIPT FLUSH, a restart, a Sentinel). Stop and start it again on the same port and
    directory to restart it."""

    argv: list[str]
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _client: redis.Redis | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"redis-server exited: {' '.join(self.argv)}")
            # A PING, not a connect: a server loading its append-only file refuses commands.
            try:
                with redis.Redis(port=self.port, socket_connect_timeout=0.5) as client:
                    return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(up, 10, 0.05, f"redis-server on port {self.port}")

    @property
    def client(self) -> redis.Redis:
        """A client of this server (closed when the server stops)."""
        if self._client is None:
            self._client = redis.Redis(port=self.port)
        return self._client

    def freeze(self) -> None:
        """Stop the server (SIGSTOP): connections stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            terminate(self.process)
            self.process = None

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
