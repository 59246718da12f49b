"""Several hosts: a worker host cut off mid-run loses nothing, and comes back when its link does.

Redis runs in one network namespace and a worker in each of two others (tests/netns.py). While
both drain a queue, one worker host's link goes down: the messages that worker had reserved or
was running come back to the queue when its leases run out, and the other host runs them. Every
task completes at least once; duplicates (a cut-off task that finished once the link returned)
are counted and bounded by what the cut worker held.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from taskyard.testing import celery_worker, run_python, terminate, wait_until
from tests import netns, servers

pytestmark = pytest.mark.slow

PORT = 6391
TASKS = 80
#: Short leases and sweeps so the test takes seconds, not the production 30 s.
LEASE_S = 6.0
SWEEP_S = 1.0


def _worker_env(url: str) -> dict[str, str]:
    return {
        "TASKYARD_REDIS_URL": url,
        "TASKYARD_GUARD__ENABLED": "false",
        "TASKYARD_RESERVATION_LEASE_S": str(LEASE_S),
        "TASKYARD_UNACKED_RESTORE_INTERVAL_S": str(SWEEP_S),
    }


def _send(url: str, first: int, count: int) -> None:
    code = (
        f"from tests.apps import netcut\n"
        f"for i in range({first}, {first + count}): netcut.unit.delay(i)"
    )
    run_python(_worker_env(url), code, timeout_s=60)


def _runs(client: redis.Redis) -> dict[int, int]:
    return {int(k): int(v) for k, v in client.hgetall("netcut:runs").items()}


def _ran_by(client: redis.Redis, node: str) -> set[int]:
    return {int(n) for n in client.smembers(f"netcut:by:{node}")}


def test_cut_worker_host_loses_nothing_and_recovers(tmp_path: Path) -> None:
    netns.require()
    servers.require_program("redis-server")
    with netns.hosts(["east", "west"]) as hosts:
        server = subprocess.Popen(
            [
                *hosts.exec_prefix("redis"),
                "redis-server",
                "--port",
                str(PORT),
                "--bind",
                "0.0.0.0",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            test_url = f"redis://{hosts.redis_addr['test']}:{PORT}/0"
            client = redis.Redis.from_url(test_url, socket_timeout=5)
            wait_until(lambda: _pings(client), 10, message="Redis in its namespace")
            east_url = f"redis://{hosts.redis_addr['east']}:{PORT}/0"
            west_url = f"redis://{hosts.redis_addr['west']}:{PORT}/0"
            node = socket.gethostname()
            with (
                celery_worker(
                    "tests.apps.netcut",
                    "normal",
                    _worker_env(east_url),
                    tmp_path,
                    name="east",
                    prefix=hosts.exec_prefix("east"),
                ) as east,
                celery_worker(
                    "tests.apps.netcut",
                    "normal",
                    _worker_env(west_url),
                    tmp_path,
                    name="west",
                    prefix=hosts.exec_prefix("west"),
                ),
            ):
                _send(test_url, 0, TASKS)
                wait_until(
                    lambda: len(_ran_by(client, f"east@{node}")) >= 3,
                    60,
                    message="east to run some tasks",
                )
                hosts.cut("east")
                cut_at = time.monotonic()
                wait_until(
                    lambda: len(_runs(client)) == TASKS,
                    LEASE_S * 6 + TASKS * 0.3,
                    interval_s=0.2,
                    message=f"all {TASKS} tasks to complete (east's reserved work on west)",
                )
                recovered_s = time.monotonic() - cut_at
                east_before = _ran_by(client, f"east@{node}")

                hosts.restore("east")
                _send(test_url, TASKS, 40)
                wait_until(
                    lambda: (
                        len(_ran_by(client, f"east@{node}") - east_before - set(range(TASKS))) >= 1
                    ),
                    90,
                    interval_s=0.5,
                    message=f"east to run new work after its link returned:\n"
                    f"{east.output()[-2000:]}",
                )
                wait_until(
                    lambda: len(_runs(client)) == TASKS + 40,
                    60,
                    interval_s=0.2,
                    message="the second round",
                )
            runs = _runs(client)
            duplicates = sum(count - 1 for count in runs.values())
            print(f"recovered in {recovered_s:.1f} s after the cut; duplicates {duplicates}")
            assert set(runs) == set(range(TASKS + 40))
            # What east held when cut can run twice: a worker without urgent queues reserves
            # 4 per process (workers/prefetch.py), and east has two. A few more are allowed for
            # a loaded machine where west's own renewal comes late.
            assert duplicates <= 2 * 4 + 4, runs
            # How fast west took over is printed, not asserted (a loaded machine stretches
            # it): the bounded wait above is the outcome, every task done within it.
        finally:
            terminate(server)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
