"""Where the real servers of the test suite are, and how a test asks for one.

A test that needs a server calls :func:`require`: when the server does not answer, the test is
skipped locally with the reason, and fails when ``CI=true``.
"""

from __future__ import annotations

import os
import socket

import pytest

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
#: Database the suite owns; flushed around each test (never FLUSHALL).
REDIS_DB = int(os.environ.get("TASKYARD_TEST_REDIS_DB", "9"))
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
