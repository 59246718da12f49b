"""Shared fixtures: a dedicated Redis database per test and apps pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests import servers


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """Client on the suite's own database, flushed before and after the test."""
    servers.require("redis")
    client = redis.Redis.from_url(servers.REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def redis_env(redis_client: redis.Redis) -> dict[str, str]:
    """Environment for child processes: broker and Redis on the suite's database."""
    return {"TASKYARD_REDIS_URL": servers.REDIS_URL}


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_env(request: pytest.FixtureRequest, redis_env: dict[str, str]) -> dict[str, str]:
    """Worker environment: Redis for buffers and stats on the suite's database, the broker
    that Redis or RabbitMQ (a test taking this runs once on each)."""
    env = dict(redis_env)
    if request.param == "rabbitmq":
        servers.require("rabbitmq")
        env["TASKYARD_BROKER_URL"] = servers.RABBITMQ_URL
        servers.purge_rabbitmq()
    return env


@pytest.fixture
def make_app(redis_client: redis.Redis) -> Iterator[Any]:
    """Factory for taskyard apps on the suite's Redis database."""
    from taskyard import create_app

    apps = []

    def factory(name: str = "test", **overrides: Any) -> Any:
        overrides.setdefault("redis_url", servers.REDIS_URL)
        app = create_app(name, **overrides)
        app.set_current()
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.close()
