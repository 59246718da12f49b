"""`taskyard env` and `taskyard shell` carry a running stack's settings into one's own shell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from taskyard.devstack import stackfile
from taskyard.testing import child_env
from tests import servers


def _write_stack(directory: Path, redis_url: str) -> None:
    stack = stackfile.new(
        stackfile.stack_path(directory),
        {"TASKYARD_REDIS_URL": redis_url, "TASKYARD_RESULT_BACKEND": redis_url},
        {},
        app="tests.apps.fivelevels",
    )
    stackfile.write(stack)  # pid: this test process, alive


def _taskyard(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskyard.cli", *args],
        env=child_env({}),
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_env_prints_the_stacks_settings_for_eval(tmp_path: Path) -> None:
    _write_stack(tmp_path, "redis://127.0.0.1:7/3")
    done = _taskyard("env", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "export TASKYARD_REDIS_URL=redis://127.0.0.1:7/3" in done.stdout.splitlines()
    shell = subprocess.run(
        ["sh", "-c", f'eval "$({sys.executable} -m taskyard.cli env)"; echo "$TASKYARD_REDIS_URL"'],
        env=child_env({}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shell.stdout.strip() == "redis://127.0.0.1:7/3"


def test_env_without_a_stack_says_so(tmp_path: Path) -> None:
    done = _taskyard("env", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout == ""
    assert "no TASKYARD_* settings here" in done.stderr


def test_shell_sends_to_the_stacks_redis(redis_client: redis.Redis, tmp_path: Path) -> None:
    _write_stack(tmp_path, servers.REDIS_URL)
    done = _taskyard(
        "shell",
        "-A",
        "tests.apps.fivelevels",
        cwd=tmp_path,
        stdin="\n".join(
            [
                "print('app', app.main)",
                "r = app.send_task('x.y', queue='normal')",
                "print('id', r.id)",
            ]
        ),
    )
    assert done.returncode == 0, done.stderr
    assert "app fivelevels" in done.stdout
    task_id = done.stdout.split("id ", 1)[1].split()[0]
    queued = b"".join(
        m
        for k in redis_client.keys("normal*")
        for m in redis_client.lrange(k, 0, -1)
        if isinstance(m, bytes)
    )
    assert task_id.encode() in queued
