"""Real `celery beat` and `celery worker` processes: one run per period, one warm at start."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from taskyard.beat import period_index
from taskyard.maintenance import recent_runs
from taskyard.runtime import runtime_of
from taskyard.testing import ROOT, celery_worker, child_env, terminate, wait_until
from tests.apps.periodic import RUNS_KEY

OTHER_JOBS = json.dumps(
    ["taskyard.maintenance.run", "taskyard.batching.reap", "taskyard.stats.collect"]
)
#: The resource guards would hold the low queue back on this busy 2-core test machine; they are
#: not what these tests are about.
NO_GUARDS = {"TASKYARD_GUARD__ENABLED": "false"}


@contextmanager
def beat(env: dict[str, str], tmp_path: Path, name: str) -> Iterator[Path]:
    log = tmp_path / f"beat-{name}.log"
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests.apps.periodic",
        "beat",
        "-s",
        str(tmp_path / f"schedule-{name}"),
        "--pidfile",
        str(tmp_path / f"{name}.pid"),
        "--loglevel",
        "INFO",
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            argv,
            env=child_env(env),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
    try:
        yield log
    finally:
        terminate(process)


def _runs(redis_client: Any) -> list[float]:
    return [float(v) for v in redis_client.lrange(RUNS_KEY, 0, -1)]


@pytest.mark.slow
def test_two_beats_give_one_run_per_period(
    redis_client: Any, redis_env: dict[str, str], tmp_path: Path
) -> None:
    interval = 2.0
    env = {
        **redis_env,
        **NO_GUARDS,
        "TASKYARD_CACHE__WARM_INTERVAL_S": str(interval),
        "TASKYARD_SCHEDULE__DISABLED": OTHER_JOBS,
        "TASKYARD_SCHEDULE__WARM_ON_START": "false",
    }
    with (
        celery_worker(
            "tests.apps.periodic", "low", env, tmp_path, concurrency=2, name="beat-worker"
        ),
        beat(env, tmp_path, "one") as log_one,
        beat(env, tmp_path, "two") as log_two,
    ):
        wait_until(lambda: len(_runs(redis_client)) >= 4, 30, 0.1, "four warm runs")
        time.sleep(interval)  # one more period: any duplicate of the last run shows up
        runs = _runs(redis_client)
        sent = [
            log.read_text().count("Sending due task taskyard.cache.warm")
            for log in (log_one, log_two)
        ]
    periods = [period_index(interval, t) for t in runs]
    assert len(periods) == len(set(periods)), f"a period ran twice: {runs}"
    assert all(b - a >= interval * 0.5 for a, b in itertools.pairwise(runs)), runs
    # Both beats really sent every period: the runs were deduplicated, not the sends.
    assert min(sent) >= 3, sent
    assert sum(sent) >= 2 * len(runs) - 2, (sent, runs)


@pytest.mark.slow
def test_warmers_run_once_cluster_wide_when_workers_start(
    redis_client: Any, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **redis_env,
        **NO_GUARDS,
        "TASKYARD_CACHE__WARM_INTERVAL_S": "3600",
        "TASKYARD_SCHEDULE__DISABLED": OTHER_JOBS,
    }
    with (
        celery_worker("tests.apps.periodic", "low", env, tmp_path, concurrency=1, name="w1") as one,
        celery_worker("tests.apps.periodic", "low", env, tmp_path, concurrency=1, name="w2") as two,
    ):

        def done_count() -> int:
            return sum(w.output().count("succeeded in") for w in (one, two))

        wait_until(lambda: done_count() >= 2, 30, 0.1, "both start-up warm requests")
        logs = one.output() + two.output()
    assert len(_runs(redis_client)) == 1
    assert "'skipped': True" in logs and "'reason': 'period-taken'" in logs
    report = json.loads(redis_client.get("taskyard:cache-warm:last"))
    assert report["trigger"] == "startup" and report["keys"] == 5
    assert report["warmers"][0]["name"] == "periodic_test"


@pytest.mark.slow
def test_failed_maintenance_is_recorded_and_worker_keeps_running(
    redis_client: Any, redis_env: dict[str, str], make_app: Any, tmp_path: Path
) -> None:
    history = f"sqlite:///{tmp_path / 'history.db'}"
    env = {
        **redis_env,
        **NO_GUARDS,
        "TASKYARD_SCHEDULE__DISABLED": OTHER_JOBS,
        "TASKYARD_SCHEDULE__WARM_ON_START": "false",
        "TASKYARD_DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:1/test",
        "TASKYARD_HISTORY_DATABASE_URL": history,
        "TASKYARD_MAINTENANCE__METADATA": "examples.bdc.models:Base.metadata",
    }
    sender = make_app("sender", database_url="sqlite://", history_database_url=history)
    with celery_worker(
        "tests.apps.periodic", "low", env, tmp_path, concurrency=1, name="maint"
    ) as worker:
        sender.send_task("taskyard.maintenance.run")
        wait_until(lambda: bool(recent_runs(runtime_of(sender))), 30, 0.2, "a recorded run")
        run = recent_runs(runtime_of(sender))[0]
        assert run["status"] == "failed" and "database unreachable" in run["reason"]
        sender.send_task("taskyard.cache.warm", kwargs={"trigger": "after-failure"})
        wait_until(lambda: bool(redis_client.llen(RUNS_KEY)), 30, 0.1, "the next task to run")
        assert worker.process.poll() is None
    report = json.loads(redis_client.get("taskyard:maintenance:last"))
    assert report["status"] == "failed"
