"""Ctrl-C on `taskyard up` lets a running task finish (issue 18 item 11)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

from taskyard.testing import ROOT, child_env, start_up, wait_started, wait_until
from tests import servers


def test_ctrl_c_during_a_running_task_lets_it_finish(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    env = {
        "TASKYARD_REDIS_URL": servers.REDIS_URL,
        "TASKYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'up.db'}",
        "TASKYARD_GUARD__ENABLED": "false",
    }
    up, log = start_up("tests.apps.prio", tmp_path, env, "--no-beat")
    try:
        wait_started(up, log, 120)
        subprocess.run(
            [sys.executable, "-c", "from tests.apps import prio; prio.slow_work.delay(1, 4.0)"],
            env=child_env(env),
            cwd=ROOT,
            check=True,
            timeout=60,
        )
        wait_until(
            lambda: any(x.startswith(b"start-1") for x in redis_client.lrange("test:order", 0, -1)),
            60,
            0.05,
            "the task to start",
        )
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends
        up.wait(90)
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert any(x.startswith(b"done-1") for x in redis_client.lrange("test:order", 0, -1)), output
    assert "WorkerLostError" not in output
    assert up.returncode == 0, output[-3000:]
