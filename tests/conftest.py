"""Shared fixtures: a dedicated Redis database per test and apps pointed at it, Redis servers of
a test's own, and `taskyard api` in a process of its own."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from taskyard.devstack.supervisor import free_port
from taskyard.testing import ROOT, child_env, terminate, wait_until
from tests import servers
from tests.servers import RedisServer

if sys.version_info < (3, 12) and hasattr(traceback, "_extract_caret_anchors_from_line_segment"):
    # CPython 3.11 keeps the AST converter's recursion depth in interpreter-wide state, and
    # its traceback formatting parses source lines to place the ``^~~`` markers. A background
    # thread logging a traceback while the test thread parses (pytest's assertion rewriting,
    # tests/test_seams.py) can trip the converter's consistency check: "SystemError: AST
    # constructor recursion depth mismatch". Tracebacks here go without those markers.
    traceback._extract_caret_anchors_from_line_segment = lambda segment: None  # type: ignore[attr-defined]

#: Test ids naming a server whose state every database shares, and the group whose tests run
#: one at a time: RabbitMQ's queues (the five levels, ``celery``) live in one vhost,
#: PostgreSQL's tables and indexes in one database. Redis keys need no such care: each
#: pytest-xdist worker has its own database (servers.py).
SHARED_SERVERS = {"rabbitmq": ("rabbitmq", "amqp"), "postgresql": ("postgres",)}
SHARED_SERVER_PATHS = {"postgresql": ("tests/maintenance/", "tests/test_database.py")}


def shared_server_group(item: pytest.Item) -> str | None:
    nodeid = item.nodeid.lower()
    for group, words in SHARED_SERVERS.items():
        if any(word in nodeid for word in words) or nodeid.startswith(
            SHARED_SERVER_PATHS.get(group, ())
        ):
            return group
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # For `--dist loadgroup`: one xdist worker takes each group (where the installed xdist
    # honours the mark; the lock below holds either way).
    for item in items:
        group = shared_server_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _one_at_a_time_on_shared_servers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests of a shared-server group hold an exclusive lock file of the machine for their whole
    run (autouse: taken before the fixtures that purge queues or create tables), so parallel
    workers, and other checkouts' runs on the same servers, take turns."""
    group = shared_server_group(request.node)
    if group is None:
        yield
        return
    path = Path(tempfile.gettempdir()) / f"taskyard-tests-{group}.lock"
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # bounded by the test's timeout (pytest-timeout)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory: ``redis_server(*options, conf="")`` starts a private ``redis-server`` on a spare
    port (no persistence unless ``options`` turn it on; ``conf`` is written to a config file
    first, e.g. for ``--sentinel``); every one is stopped after the test. Skips locally and
    fails under ``CI=true`` when ``redis-server`` is not installed."""
    binary = servers.require_program("redis-server")
    started: list[RedisServer] = []

    def start(*options: str, conf: str = "") -> RedisServer:
        port = free_port()
        argv = [binary]
        if conf:
            path = tmp_path / f"redis-{port}.conf"
            path.write_text(conf)
            argv.append(str(path))
        argv += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
        # Later options win: a test turning append-only on overrides these.
        argv += ["--save", "", "--appendonly", "no", *options]
        server = RedisServer(argv, port)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def taskyard_api(tmp_path: Path) -> Iterator[Callable[[Mapping[str, str]], str]]:
    """Factory: ``taskyard_api(env)`` runs ``taskyard api`` (uvicorn) in its own process on a
    spare port with :func:`~taskyard.testing.child_env` of ``env`` (history in a SQLite file
    of the test unless ``env`` names a database); returns its URL once ``/health/live``
    answers, and stops it after the test."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(env: Mapping[str, str]) -> str:
        port = free_port()
        log = tmp_path / f"api-{port}.log"
        extra = {"TASKYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'history.db'}", **env}
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "taskyard.cli", "api", "--port", str(port)],
                env=child_env(extra),
                cwd=ROOT,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"

        def live() -> bool:
            if process.poll() is not None:
                raise AssertionError("taskyard api exited:\n" + log.read_text(errors="replace"))
            try:
                return httpx.get(url + "/health/live", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(live, 60, 0.2, "taskyard api to answer")
        return url

    yield start
    for process in processes:
        terminate(process)
