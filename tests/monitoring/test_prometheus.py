"""A real Prometheus server scrapes a running stack; its HTTP API gives the series back.

Needs Debian's ``prometheus`` package (scripts/ensure-prometheus.sh installs it; `make test`
runs that first). The stack: a real ``celery worker`` running tasks, the stats collection, and
``taskyard api`` serving ``/metrics``; Prometheus scrapes it every second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from taskyard.devstack.supervisor import free_port
from taskyard.testing import celery_worker, child_env, terminate, wait_until
from tests import servers

APP = "tests.apps.fivelevels"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

pytestmark = pytest.mark.slow


def require_prometheus() -> None:
    if os.access(PROMETHEUS, os.X_OK):
        return
    reason = f"{PROMETHEUS} is missing (run scripts/ensure-prometheus.sh)"
    if servers.in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


def serve(
    argv: list[str], env: dict[str, str], log: Path, url: str, cwd: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{argv[0]} exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, 60, 0.2, f"{url} to answer")
    return process


@pytest.fixture
def api(redis_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = child_env(
        {
            **redis_env,
            "TASKYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}",
            "TASKYARD_MONITORING__API_CACHE_S": "0",
        }
    )
    process = serve(
        [sys.executable, "-m", "taskyard.cli", "api", "--port", str(port)],
        env,
        tmp_path / "api.log",
        f"http://127.0.0.1:{port}/health/live",
        tmp_path,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        terminate(process)


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]  # type: ignore[no-any-return]


def test_prometheus_scrapes_the_stack_and_answers_depth_and_task_counters(
    api: str, make_app: Any, redis_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    require_prometheus()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: taskyard\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{api}']\n"
    )
    prometheus_url = f"http://127.0.0.1:{port}"
    prometheus = serve(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        dict(os.environ),
        tmp_path / "prometheus.log",
        f"{prometheus_url}/-/ready",
        tmp_path,
    )
    try:
        app = make_app("prom")
        worker_env = {
            **redis_env,
            **{
                f"TASKYARD_GUARD__{name}": "100"
                for name in (
                    "CPU_WARNING_PCT",
                    "CPU_CRITICAL_PCT",
                    "MEMORY_WARNING_PCT",
                    "MEMORY_CRITICAL_PCT",
                )
            },
            "TASKYARD_MONITORING__FLUSH_INTERVAL_S": "0.2",
        }
        with celery_worker(APP, "normal", worker_env, tmp_path, name="prom"):
            for i in range(7):
                app.send_task(f"{APP}.on_normal", args=[i], queue="normal", routing_key="normal")
            # Nobody consumes "low": its depth stays at 4.
            for i in range(4):
                app.send_task(f"{APP}.on_low", args=[i], queue="low", routing_key="low")

            def series(promql: str, expected: float) -> bool:
                result = query(prometheus_url, promql)
                return bool(result) and float(result[0]["value"][1]) == expected

            wait_until(
                lambda: series(
                    f'celery_task_succeeded_total{{name="{APP}.on_normal",queue_name="normal"}}',
                    7.0,
                ),
                60,
                0.5,
                "Prometheus to hold the task counter",
            )
        wait_until(
            lambda: series('celery_queue_length{queue_name="low"}', 4.0),
            30,
            0.5,
            "Prometheus to hold the queue depth",
        )
        up = query(prometheus_url, 'up{job="taskyard"}')
        assert [float(r["value"][1]) for r in up] == [1.0]
        age = query(prometheus_url, 'taskyard_queue_oldest_ready_age_seconds{queue_name="low"}')
        assert age and float(age[0]["value"][1]) >= 0
        # A range query over the scraped history: the counter never went backwards.
        answer = httpx.get(
            f"{prometheus_url}/api/v1/query",
            timeout=5,
            params={"query": f'celery_task_succeeded_total{{name="{APP}.on_normal"}}[1m]'},
        ).json()
        values = [float(v) for _, v in answer["data"]["result"][0]["values"]]
        assert values == sorted(values) and values[-1] == 7.0
    finally:
        terminate(prometheus)
