"""The CLI finds the stack: the stack file of `taskyard up`, the Redis line, one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from taskyard.cli.loader import configured
from taskyard.config import load_settings
from taskyard.devstack import stackfile
from taskyard.devstack.supervisor import free_port
from taskyard.testing import child_env, monitoring_ports_env, start_up, wait_started, wait_until
from tests import servers


def taskyard(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskyard.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ended_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# --- the file itself -----------------------------------------------------------------------------


def test_written_owner_only_read_back_and_exported(tmp_path: Path) -> None:
    path = stackfile.stack_path(tmp_path)
    stack = stackfile.new(
        path,
        {
            "TASKYARD_REDIS_URL": "redis://127.0.0.1:7/0",
            "TASKYARD_MONITORING__FLOWER_BASIC_AUTH": "admin:it's",
        },
        {"flower": "http://127.0.0.1:5555/"},
        app="bdc",
    )
    stackfile.write(stack)
    assert path.stat().st_mode & 0o777 == 0o600
    again = stackfile.read(path)
    assert again is not None and again.env == stack.env and again.urls == stack.urls
    assert again.pid == os.getpid() and again.alive and again.app == "bdc"
    assert again.export_lines() == [
        "export TASKYARD_MONITORING__FLOWER_BASIC_AUTH='admin:it'\"'\"'s'",
        "export TASKYARD_REDIS_URL=redis://127.0.0.1:7/0",
    ]
    assert not list(tmp_path.glob("*.tmp"))
    stackfile.remove_if_owned(path, os.getpid() + 1)
    assert path.exists()
    stackfile.remove_if_owned(path, os.getpid())
    assert not path.exists()
    assert stackfile.read(path) is None


def test_a_planted_temporary_file_neither_widens_nor_receives_the_secrets(tmp_path: Path) -> None:
    path = stackfile.stack_path(tmp_path)
    planted = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    planted.write_text("planted\n")
    planted.chmod(0o644)
    stackfile.write(stackfile.new(path, {"TASKYARD_API_TOKEN": "s3cret"}, {}))
    assert path.stat().st_mode & 0o777 == 0o600
    assert planted.read_text() == "planted\n"  # never opened, never truncated


def test_a_planted_symlink_never_receives_the_secrets(tmp_path: Path) -> None:
    path = stackfile.stack_path(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("")
    planted = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    planted.symlink_to(target)
    stackfile.write(stackfile.new(path, {"TASKYARD_API_TOKEN": "s3cret"}, {}))
    assert target.read_text() == ""
    assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600
    assert "s3cret" in path.read_text()


def test_a_symlink_planted_at_the_stack_file_is_replaced_not_followed(tmp_path: Path) -> None:
    path = stackfile.stack_path(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("")
    path.symlink_to(target)
    stackfile.write(stackfile.new(path, {"TASKYARD_API_TOKEN": "s3cret"}, {}))
    assert target.read_text() == ""
    assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600


def test_a_broken_file_is_named_not_misread(tmp_path: Path) -> None:
    path = stackfile.stack_path(tmp_path)
    for text in ("{not json", json.dumps({"version": 99, "pid": 1}), json.dumps([1])):
        path.write_text(text)
        with pytest.raises(stackfile.StackFileError, match="not a taskyard stack file"):
            stackfile.read(path)
        resolution = stackfile.apply({}, lambda name: False, tmp_path)
        assert resolution.stack is None and "not a taskyard stack file" in str(resolution.ignored)


def test_environment_wins_over_the_file_which_wins_over_defaults(tmp_path: Path) -> None:
    path = stackfile.stack_path(tmp_path)
    stackfile.write(
        stackfile.new(
            path,
            {"TASKYARD_REDIS_URL": "redis://127.0.0.1:7/0", "TASKYARD_NAMESPACE": "fromfile"},
            {},
        )
    )
    environ = {"TASKYARD_NAMESPACE": "fromenv"}
    resolution = stackfile.apply(environ, lambda name: name in environ, tmp_path)
    assert environ == {
        "TASKYARD_NAMESPACE": "fromenv",
        "TASKYARD_REDIS_URL": "redis://127.0.0.1:7/0",
    }
    assert resolution.applied == ["TASKYARD_REDIS_URL"]
    line = stackfile.redis_line("redis://127.0.0.1:7/0", resolution, "TASKYARD_REDIS_URL")
    assert line is not None and line.startswith(
        "taskyard: reading Redis redis://127.0.0.1:7/0 from .taskyard-stack.json"
    )


def test_a_file_of_an_ended_stack_is_ignored_with_a_reason(tmp_path: Path) -> None:
    path = stackfile.stack_path(tmp_path)
    stack = stackfile.new(path, {"TASKYARD_REDIS_URL": "redis://127.0.0.1:7/0"}, {})
    stack.pid = ended_pid()
    stackfile.write(stack)
    environ: dict[str, str] = {}
    resolution = stackfile.apply(environ, lambda name: False, tmp_path)
    assert environ == {} and resolution.stack is None
    line = stackfile.redis_line("redis://127.0.0.1:6379/0", resolution, "TASKYARD_REDIS_URL")
    assert line is not None and "the default" in line and "has ended" in line
    assert str(stack.pid) in line


def test_a_reused_pid_is_not_the_stack(tmp_path: Path) -> None:
    """A live process that started after the file was written did not write it."""
    stack = stackfile.new(stackfile.stack_path(tmp_path), {}, {})
    assert stack.alive
    stack.started_at -= 3600  # written an hour before this process started
    assert not stack.alive


def test_configured_reads_what_the_settings_module_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKYARD_MONITORING__API_PORT", "8123")
    monkeypatch.delenv("TASKYARD_REDIS_URL", raising=False)
    settings = load_settings()
    assert configured(settings, "TASKYARD_MONITORING__API_PORT")
    assert not configured(settings, "TASKYARD_MONITORING__FLOWER_BASIC_AUTH")
    assert not configured(settings, "TASKYARD_REDIS_URL")
    assert not configured(settings, "TASKYARD_GUARD__ENABLED")


# --- the command line ------------------------------------------------------------------------


def test_the_default_redis_is_named_and_an_empty_one_warned_about(tmp_path: Path) -> None:
    servers.require("redis")
    # A namespace nobody writes: the default Redis holds no data of it.
    env = child_env({"TASKYARD_NAMESPACE": f"empty-{uuid.uuid4().hex[:8]}"})
    done = taskyard("stats", "show", "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == (
        "taskyard: reading Redis redis://127.0.0.1:6379/0, the default "
        "(no TASKYARD_REDIS_URL, no .taskyard-stack.json here)"
    )
    assert lines[1].startswith(
        "taskyard: warning: Redis redis://127.0.0.1:6379/0 holds no taskyard data"
    )
    assert len(lines) == 2
    assert json.loads(done.stdout)["workers"] == []  # stdout stays clean JSON
    # Configured in the environment: no line about it, and data present: no warning.
    env = child_env({"TASKYARD_REDIS_URL": servers.REDIS_URL})
    import redis

    client = redis.Redis.from_url(servers.REDIS_URL)
    client.zadd("taskyard:workers", {"w@h": 1.0})
    done = taskyard("stats", "show", env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    client.delete("taskyard:workers")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("stats", "show", "-A", "no_such_module_xyz"), "cannot load app 'no_such_module_xyz'"),
        (("stats", "show", "-A", "tests.apps.fivelevels:nope"), "cannot load app"),
        (("stats", "show", "--colour"), "No such option '--colour'"),
        (("stats", "shwo"), "No such command 'shwo'"),
        (("worker", "--profile", "nosuch", "-A", "tests.apps.fivelevels"), "nosuch"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    done = taskyard(*args, env=child_env({"TASKYARD_REDIS_URL": servers.REDIS_URL}), cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("taskyard: error: "), done.stderr
    assert message in lines[0]


def test_an_unreachable_redis_is_one_line_and_exit_2(tmp_path: Path) -> None:
    port = free_port()
    done = taskyard(
        "stats",
        "show",
        env=child_env({"TASKYARD_REDIS_URL": f"redis://127.0.0.1:{port}/0"}),
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"taskyard: error: cannot reach Redis at redis://127.0.0.1:{port}/0: Error 111 "
        f"connecting to 127.0.0.1:{port}. Connection refused."
    ]


@pytest.mark.slow
def test_a_second_shell_finds_the_stack_of_taskyard_up(tmp_path: Path) -> None:
    """`taskyard up` in a directory; a plain shell there (no TASKYARD_*) reads its Redis, its
    generated Flower password works, and the file goes when the stack stops."""
    env = {
        "TASKYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'up.db'}",
        **monitoring_ports_env(),
    }
    up, log = start_up("tests.apps.fivelevels", tmp_path, env, "--no-beat")
    path = tmp_path / ".taskyard-stack.json"
    try:
        text = wait_started(up, log, 90)
        stack = json.loads(path.read_text())
        redis_url = stack["env"]["TASKYARD_REDIS_URL"]
        assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", redis_url)
        assert not redis_url.startswith("redis://127.0.0.1:6379/")
        # The export lines are printed, the generated password once.
        auth = stack["env"]["TASKYARD_MONITORING__FLOWER_BASIC_AUTH"]
        assert f"export TASKYARD_REDIS_URL={redis_url}" in text
        assert text.count(auth.partition(":")[2]) == 1
        assert path.stat().st_mode & 0o077 == 0

        # A second shell: nothing of taskyard in its environment, same directory.
        shell = child_env({})

        def sees_workers() -> bool:
            done = taskyard("stats", "show", "--json", env=shell, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            return len(json.loads(done.stdout)["workers"]) >= 3

        try:
            wait_until(sees_workers, 60, 0.5, "the second shell to see the stack's workers")
        except AssertionError as exc:
            seen = taskyard("stats", "show", "--json", env=shell, cwd=tmp_path).stdout
            tail = log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"{exc}\nlast stats: {seen[:2000]}\nstack log:\n{tail}") from exc
        done = taskyard("stats", "show", env=shell, cwd=tmp_path)
        assert done.stderr.splitlines()[0].startswith(
            f"taskyard: reading Redis {redis_url} from .taskyard-stack.json (written by pid "
            f"{up.pid}"
        )
        assert "warning" not in done.stderr
        assert "workers" in done.stdout and "critical@" in done.stdout

        flower = stack["urls"]["flower"]
        user, _, password = auth.partition(":")
        wait_until(
            lambda: (
                httpx.get(flower + "metrics", auth=(user, password), timeout=3).status_code == 200
            ),
            60,
            0.5,
            "Flower",
        )
        assert httpx.get(flower + "metrics", timeout=3).status_code == 401
        # A second `taskyard up` here refuses: one stack per directory.
        again = taskyard("up", "-A", "tests.apps.fivelevels", env=shell, cwd=tmp_path)
        assert again.returncode == 2 and "a stack already runs" in again.stderr
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
        up.wait(60)
    assert up.returncode == 0, log.read_text(errors="replace")[-3000:]
    assert not path.exists()
