"""Stored text never reaches the operator's terminal as control sequences (issue 18, item 8)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
import tty
from pathlib import Path
from typing import Any

import click
import pytest
import redis

from taskyard.cli.output import safe, table
from taskyard.deadletters import DeadLetter, RedisDeadLetterStore
from taskyard.runtime import runtime_of
from taskyard.testing import child_env
from tests import servers

# What a task that fails with chosen text could carry: retitle (OSC 0), clear (CSI 2J), a bare
# CR faking a line, an 8-bit CSI, a clipboard write (OSC 52), a bell, a backspace.
HOSTILE = "x\x1b]0;pwned\x07\x1b[2J\rfake line\x9b31m\x1b]52;c;ZXZpbA==\x07\x08end"
CONTROLS = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if chr(c) not in "\n\t"]


def on_a_terminal(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run ``taskyard ARGS`` on a raw pseudo-terminal (no CR added to newlines); its output."""
    leader, follower = pty.openpty()
    tty.setraw(follower)
    process = subprocess.Popen(
        [sys.executable, "-m", "taskyard.cli", *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        cwd=cwd,
        close_fds=True,
    )
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed its side
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=60)
    os.close(leader)
    return b"".join(chunks).decode("utf-8")


def assert_inert(output: str) -> None:
    assert not [c for c in CONTROLS if c in output], repr(output)


def test_safe_escapes_controls_and_keeps_the_lines_of_a_traceback() -> None:
    assert safe("a\x1b[2J\rb\x9b\x7f") == "a\\x1b[2J\\x0db\\x9b\\x7f"
    assert safe("Traceback:\n\tline 1\n") == "Traceback:\n\tline 1\n"
    assert safe("one\nline\t!", lines=False) == "one\\x0aline\\x09!"
    assert safe("naïve €") == "naïve €"  # printable text is left alone


def test_a_table_cleans_every_cell(capsys: pytest.CaptureFixture[str]) -> None:
    table("t\x1b", ["h\r"], [[HOSTILE]])
    printed = click.unstyle(capsys.readouterr().out)
    assert_inert(printed.replace("\n", ""))
    assert "\\x1b]52;c;" in printed


def test_dead_list_show_and_task_print_hostile_text_inert(
    make_app: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    app = make_app("deadtty")
    RedisDeadLetterStore.for_runtime(runtime_of(app)).record(
        DeadLetter(
            id="t1",
            reason="failed",
            name="bdc." + HOSTILE,
            queue="high",
            exception_type="ValueError",
            exception=HOSTILE,
            traceback=f"Traceback (most recent call last):\n\tline 1\nValueError: {HOSTILE}\n",
            headers={"h": HOSTILE},
        )
    )
    env = child_env(
        {
            "TASKYARD_REDIS_URL": servers.REDIS_URL,
            "TASKYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}",
        }
    )
    listed = on_a_terminal(["dead", "list"], env, tmp_path)
    assert "t1" in listed and "\\x1b]0;pwned\\x07" in listed
    assert_inert(listed.replace("\n", ""))
    assert len(listed.strip().splitlines()) == 2  # the count line and one entry: no fake line

    shown = on_a_terminal(["dead", "show", "t1"], env, tmp_path)
    assert "\tline 1\n" in shown  # a traceback keeps its lines and indentation
    assert "\\x1b]52;c;ZXZpbA==\\x07" in shown
    assert_inert(shown.replace("\n", "").replace("\t", ""))

    task = on_a_terminal(["task", "t1"], env, tmp_path)
    assert "dead letter: failed" in task and "\\x9b31m" in task
    assert_inert(task.replace("\n", ""))
