"""Real workers on taskyard's Redis transport: SIGKILL loops, leases, clean stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from subprocess import Popen

import pytest
import redis

from taskyard.routing import LEVEL_NAMES
from taskyard.testing import ROOT, Worker, celery_worker, child_env, run_python, wait_until
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

ALL_QUEUES = ",".join(LEVEL_NAMES)
RUNS, STARTED, GATE, STACKS = "test:runs", "test:started", "test:gate", "test:stacks"
#: Short leases and sweeps so recovery is quick; guards out of the way on a busy machine.
LEASE_S, SWEEP_S = 2.0, 1


def _env(redis_env: dict[str, str], lease_s: float = LEASE_S) -> dict[str, str]:
    return {
        **redis_env,
        "TASKYARD_GUARD__ENABLED": "false",
        "TASKYARD_RESERVATION_LEASE_S": str(lease_s),
        "TASKYARD_UNACKED_RESTORE_INTERVAL_S": str(SWEEP_S),
    }


def _send(env: dict[str, str], code: str) -> None:
    run_python(env, f"from tests.apps import broker\n{code}")


def _runs(client: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(RUNS).items()}


def _ran(client: redis.Redis) -> int:
    """How many distinct tasks ran."""
    return int(client.hlen(RUNS))


def test_sigkill_in_a_loop_under_load_loses_nothing(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env)
    total = 400
    _send(
        env,
        f"for i in range({total}):\n"
        f"    broker.WORK[{list(LEVEL_NAMES)!r}[i % 5]].delay(f'k{{i}}', 0.01)",
    )
    kills = 0
    for round_ in range(4):
        with celery_worker(
            "tests.apps.broker", ALL_QUEUES, env, tmp_path, concurrency=2, name=f"victim{round_}"
        ) as worker:
            time.sleep(1.0 + 0.3 * round_)
            worker.kill(signal.SIGKILL)  # the whole process group, mid-fetch or mid-task
            kills += 1
    with celery_worker(
        "tests.apps.broker", ALL_QUEUES, env, tmp_path, concurrency=2, name="survivor"
    ):
        wait_until(lambda: len(_runs(redis_client)) == total, 120, 0.2, "every task to run")
        # The killed workers' reservations come back (as repeats) and run too: nothing is left
        # held or queued.
        wait_until(
            lambda: (
                redis_client.hlen("unacked") == 0
                and not any(redis_client.llen(level) for level in LEVEL_NAMES)
            ),
            60,
            0.2,
            "nothing left",
        )
    runs = _runs(redis_client)
    assert kills == 4
    assert set(runs) == {f"k{i}" for i in range(total)}
    # At-least-once: a task killed mid-run runs again; a handful of such repeats per kill.
    assert sum(runs.values()) - total <= 4 * 2 * 8


def test_whole_worker_killed_with_reserved_work_of_every_level(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    lease = 3.0
    env = _env(redis_env, lease)
    redis_client.set(GATE, 1)
    with celery_worker(
        "tests.apps.broker",
        ALL_QUEUES,
        env,
        tmp_path,
        concurrency=1,
        name="holder",
        extra=("--prefetch-multiplier", "10"),
    ) as holder:
        _send(env, "broker.hold.delay('blocker')")
        wait_until(
            lambda: redis_client.hget(RUNS, "blocker") is not None, 30, 0.1, "the blocker to start"
        )
        _send(env, "for level, task in broker.WORK.items(): task.delay(level)")
        # Every level's message reserved (recorded unacked), none left in the lists.
        wait_until(lambda: redis_client.hlen("unacked") == 6, 30, 0.1, "six reserved")
        assert not any(redis_client.llen(level) for level in LEVEL_NAMES)
        time.sleep(lease)  # reserved past a whole lease: the renewals kept them
        assert redis_client.hlen("unacked") == 6
        assert len(_runs(redis_client)) == 1
        holder.kill(signal.SIGKILL)
        killed_at = time.monotonic()
    redis_client.delete(GATE)
    with celery_worker(
        "tests.apps.broker", ALL_QUEUES, env, tmp_path, concurrency=2, name="rescuer"
    ):
        wait_until(
            lambda: all(redis_client.hget(RUNS, level) for level in LEVEL_NAMES),
            lease + SWEEP_S + 30,
            0.1,
            "the reserved work to run again",
        )
        # How long it took is printed, not asserted: the bounded wait above (a lease, a sweep
        # and a worker start on a loaded machine) is the outcome.
        print(f"reserved work ran again {time.monotonic() - killed_at:.1f} s after the kill")
    started = [entry.decode().split(":") for entry in redis_client.lrange(STARTED, 0, -1)]
    for key, queue, _ in started:
        if key in LEVEL_NAMES:
            assert queue == key  # back in its own level


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_long_task_on_a_live_worker_runs_once(
    pool: str, redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    lease = 1.0
    env = _env(redis_env, lease)
    redis_client.set(GATE, 1)
    with (
        celery_worker(
            "tests.apps.broker", "normal", env, tmp_path, concurrency=1, pool=pool, name="runner"
        ),
        celery_worker("tests.apps.broker", "normal", env, tmp_path, concurrency=1, name="sweeper"),
    ):
        _send(env, "broker.hold.delay('long')")
        wait_until(lambda: redis_client.hget(RUNS, "long") is not None, 30, 0.1, "the start")
        time.sleep(10 * lease)  # ten leases; the idle sweeper sweeps every second
        redis_client.delete(GATE)
        wait_until(lambda: redis_client.hlen("unacked") == 0, 30, 0.1, "the ack")
        time.sleep(lease + 2 * SWEEP_S)
    assert _runs(redis_client) == {"long": 1}


@contextmanager
def _fast_launcher(env: dict[str, str], tmp_path: Path, name: str) -> Iterator[Popen[bytes]]:
    """``taskyard worker --profile fast -c 2`` on the broker test app, once both are ready."""
    log = tmp_path / f"{name}.log"
    with log.open("wb") as sink:
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskyard.cli",
                "worker",
                "--profile",
                "fast",
                "-A",
                "tests.apps.broker",
                "-c",
                "2",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            env=child_env(env),
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: log.read_text(errors="replace").count(" ready.") == 2,
            60,
            0.2,
            "two fast processes",
        )
        yield launcher
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(10)


@contextmanager
def _stoppable(kind: str, env: dict[str, str], tmp_path: Path, name: str) -> Iterator[Worker]:
    """A prefork worker (-c 2) or the fast profile's launcher, as the process to SIGTERM."""
    if kind == "fast":
        with _fast_launcher(env, tmp_path, name) as launcher:
            yield Worker(launcher, tmp_path / f"{name}.log")
        return
    with celery_worker(
        "tests.apps.broker", ALL_QUEUES, env, tmp_path, concurrency=2, name=name
    ) as worker:
        yield worker


@pytest.mark.parametrize("kind", ["prefork", "fast"])
def test_clean_stops_under_load_rerun_nothing(
    kind: str, redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGTERM (warm shutdown) in the middle of a stream of short tasks, stop after stop."""
    env = _env(redis_env, 1.0)
    total, stops = 1500, 6 if kind == "prefork" else 4
    _send(env, f"for i in range({total}): broker.WORK['normal'].delay(f'k{{i}}', 0.001)")
    for stop in range(stops):
        target = len(_runs(redis_client)) + 100
        with _stoppable(kind, env, tmp_path, f"stopped{stop}") as worker:

            def ran_enough(n: int = target) -> bool:
                return _ran(redis_client) >= n

            wait_until(ran_enough, 60, 0.02, "tasks to run")
            # Every other prefork stop freezes the pool processes first: a process that had
            # just finished a task is sent its next job, which then waits in its pipe unread
            # (as on a loaded machine that is slow to schedule it) when the stop begins.
            held = worker.children() if kind == "prefork" and stop % 2 else []
            for pid in held:
                os.kill(pid, signal.SIGSTOP)
            if held:
                time.sleep(0.5)
            worker.process.send_signal(signal.SIGTERM)  # warm shutdown: finish, ack, restore
            if held:
                time.sleep(1.0)  # the stop is under way before the processes read again
            for pid in held:
                os.kill(pid, signal.SIGCONT)
            assert worker.process.wait(60) == 0
        # Everything the stopped worker held is acknowledged or back in its list.
        assert redis_client.hlen("unacked") == 0
    assert _ran(redis_client) < total  # every stop came mid-stream
    with celery_worker("tests.apps.broker", ALL_QUEUES, env, tmp_path, concurrency=2, name="after"):
        wait_until(lambda: _ran(redis_client) == total, 120, 0.2, "the rest to run")
        time.sleep(1.0 + 2 * SWEEP_S)  # past a lease and two sweeps: nothing comes back
    runs = _runs(redis_client)
    assert set(runs) == {f"k{i}" for i in range(total)}  # none lost
    assert {k: v for k, v in runs.items() if v != 1} == {}  # none run twice


def test_fast_profile_runs_solo_processes(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env)
    with _fast_launcher(env, tmp_path, "fast") as launcher:
        text = (tmp_path / "fast.log").read_text(errors="replace")
        assert "fast1@" in text and "fast2@" in text and "solo" in text
        _send(
            env,
            "for i in range(100): broker.WORK['low'].delay(f'k{i}')\n"
            "broker.WORK['critical'].delay('urgent')",
        )
        wait_until(lambda: len(_runs(redis_client)) == 101, 60, 0.1, "the fast workers")
        # The processes run with Celery's thread-local stacks (taskyard.workers.profiles).
        _send(env, "broker.stacks.delay()")
        wait_until(lambda: redis_client.exists(STACKS), 30, 0.1, "the stacks task")
        assert redis_client.get(STACKS) == b"_FastLocalStack,_FastLocalStack"
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(30) == 0
    assert redis_client.hlen("unacked") == 0
    assert set(_runs(redis_client).values()) == {1}


def test_worker_rides_out_a_redis_restart(
    redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """Its own Redis (append-only, fsync always) restarted under a consuming worker."""
    server = redis_server("--appendonly", "yes", "--appendfsync", "always")
    url = server.url
    env = {
        "TASKYARD_REDIS_URL": url,
        "TASKYARD_GUARD__ENABLED": "false",
        "TASKYARD_RESERVATION_LEASE_S": "2",
        "TASKYARD_UNACKED_RESTORE_INTERVAL_S": "1",
    }
    client = redis.Redis.from_url(url)
    try:
        with celery_worker(
            "tests.apps.broker", ALL_QUEUES, env, tmp_path, concurrency=2, name="restart"
        ):
            _send(env, "for i in range(50): broker.WORK['high'].delay(f'a{i}')")
            wait_until(lambda: client.hlen(RUNS) == 50, 60, 0.1, "the first tasks")
            server.stop()
            time.sleep(1.0)
            server.start()
            _send(env, "for i in range(50): broker.WORK['low'].delay(f'b{i}')")
            wait_until(lambda: client.hlen(RUNS) == 100, 90, 0.2, "tasks after the restart")
            wait_until(lambda: client.hlen("unacked") == 0, 30, 0.2, "nothing held")
        assert set(_runs(client)) == {f"a{i}" for i in range(50)} | {f"b{i}" for i in range(50)}
    finally:
        client.close()
