"""`taskyard up`: the development stack starts on an embedded Redis and stops with no orphans."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis

from taskyard.testing import ROOT, child_env, monitoring_ports_env, wait_until

pytestmark = pytest.mark.slow


def _pids_in_table(text: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\S.*?\s{2,}(\d+)\s", text, re.MULTILINE)]


def test_up_runs_the_stack_and_stops_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "up.log"
    env = child_env({})  # no TASKYARD_REDIS_URL: an embedded Redis must be started
    env["TASKYARD_DATABASE_URL"] = f"sqlite:///{tmp_path / 'up.db'}"
    env.update(monitoring_ports_env())
    with log.open("wb") as sink:
        up = subprocess.Popen(
            [sys.executable, "-m", "taskyard.cli", "up", "-A", "tests.apps.prio"],
            env=env,
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: "Ctrl-C" in log.read_text(errors="replace") or up.poll() is not None,
            60,
            message="the stack to start",
        )
        text = log.read_text()
        assert up.poll() is None, text
        assert "redis (embedded)" in text
        url = re.search(r"(redis://127\.0\.0\.1:\d+/0)", text)
        assert url, text
        assert not url.group(1).startswith("redis://127.0.0.1:6379/")
        for name in ("worker critical", "worker default", "worker batch", "beat"):
            assert name in text
        # Each service logs to its own file; the terminal says when each serves, then where.
        logs = tmp_path / ".taskyard-logs"
        assert " ready." in (logs / "worker-critical.log").read_text(errors="replace")
        assert "[config]" not in text, "a worker's banner reached the terminal"
        assert text.index("ready  worker critical") < text.index("redis (embedded)")
        pids = _pids_in_table(text)
        assert len(pids) >= 5

        # Work flows: a task sent to the embedded Redis runs on the critical worker.
        client = redis.Redis.from_url(url.group(1))
        wait_until(lambda: client.ping(), 10)
        subprocess.run(
            [sys.executable, "-c", "from tests.apps import prio; prio.critical_work.delay(7)"],
            env={**env, "TASKYARD_REDIS_URL": url.group(1)},
            cwd=ROOT,
            check=True,
            timeout=60,
        )
        wait_until(lambda: client.llen("test:order") == 1, 60, message="the task to run")
        client.close()

        family = set(pids)
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                family.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        up.send_signal(signal.SIGINT)
        up.wait(60)
        assert up.returncode == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = [
                p
                for p in family
                if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
            ]
            if not alive:
                break
            time.sleep(0.2)
        assert not alive, f"left running: {alive}"
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGKILL)
