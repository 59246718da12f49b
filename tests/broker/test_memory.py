"""A Redis that evicts is refused at start; evictions and memory in /metrics (issue 18 item 5)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from taskyard.broker import memory
from taskyard.errors import ConfigurationError
from taskyard.runtime import runtime_of
from taskyard.testing import child_env, spawn, wait_until, worker_argv
from tests import servers
from tests.servers import RedisServer


def start_worker(url: str, tmp_path: Path, **extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    env = {"TASKYARD_REDIS_URL": url, "TASKYARD_GUARD__ENABLED": "false", **extra}
    log = tmp_path / f"worker-{len(list(tmp_path.glob('worker-*')))}.log"
    argv = worker_argv("tests.apps.broker", "normal", concurrency=1, pool="solo")
    return spawn(argv, env, log), log


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru"])
def test_a_worker_refuses_to_start_on_a_broker_redis_that_evicts(
    tmp_path: Path, policy, redis_server: Callable[..., RedisServer]
) -> None:
    with redis_server("--maxmemory", "64mb", "--maxmemory-policy", policy) as server:
        process, log = start_worker(server.url, tmp_path)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"the worker started on {policy}:\n{log.read_text()[-2000:]}")
        output = log.read_text()
        assert process.returncode != 0
        assert f"maxmemory-policy {policy}" in output and "noeviction" in output, output
        assert "TASKYARD_ALLOW_EVICTING_REDIS" in output


def test_the_override_starts_it_anyway(
    tmp_path: Path, redis_server: Callable[..., RedisServer]
) -> None:
    with redis_server("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru") as s:
        process, log = start_worker(s.url, tmp_path, TASKYARD_ALLOW_EVICTING_REDIS="true")
        try:
            wait_until(lambda: " ready." in log.read_text(), 60, 0.2, "the worker to start")
            assert "allkeys-lru" in log.read_text()  # still said, as a warning
        finally:
            process.terminate()
            process.wait(30)


def test_taskyard_up_refuses_too(tmp_path: Path, redis_server: Callable[..., RedisServer]) -> None:
    with redis_server("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru") as s:
        done = subprocess.run(
            [sys.executable, "-m", "taskyard.cli", "up", "-A", "tests.apps.fivelevels"],
            env=child_env(
                {
                    "TASKYARD_REDIS_URL": s.url,
                    "TASKYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'up.db'}",
                }
            ),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stdout + done.stderr
        assert "maxmemory-policy allkeys-lru" in done.stderr
        assert not (tmp_path / ".taskyard-stack.json").exists()


def test_volatile_eviction_is_only_refused_where_ttls_matter(
    make_app, redis_server: Callable[..., RedisServer]
) -> None:
    # The buffers' Redis of its own (broker elsewhere): its keys with a TTL are cache entries,
    # heartbeats and locks that are fine to lose early, so volatile-* is accepted there.
    with redis_server("--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru") as s:
        app = make_app("policy", redis_url=s.url, broker_url=servers.REDIS_URL)
        memory.check_eviction(runtime_of(app).settings)  # no error
        s.client.config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(ConfigurationError, match="maxmemory-policy allkeys-lru"):
            memory.check_eviction(runtime_of(app).settings)
