"""`taskyard flower` removes what it wrote to the stack file when it stops (issue 18 item 11)."""

from __future__ import annotations

import json
from pathlib import Path

from taskyard.cli.flower import AUTH_VARIABLE
from taskyard.devstack import stackfile
from tests.monitoring.test_flower import running_flower


def test_a_stack_file_flower_made_is_removed_when_it_stops(
    redis_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / ".taskyard-stack.json"
    with running_flower(redis_env, tmp_path, auth=None, cwd=tmp_path):
        assert AUTH_VARIABLE in json.loads(path.read_text())["env"]
    assert not path.exists()


def test_what_flower_added_to_a_running_stack_is_taken_back(
    redis_env: dict[str, str], tmp_path: Path
) -> None:
    # A stack file of a live process (this one), as `taskyard up` leaves it.
    path = stackfile.stack_path(tmp_path)
    stackfile.write(stackfile.new(path, {"TASKYARD_NAMESPACE": "ns"}, {"api": "http://x/"}))
    with running_flower(redis_env, tmp_path, auth=None, cwd=tmp_path):
        recorded = json.loads(path.read_text())
        assert AUTH_VARIABLE in recorded["env"] and "flower" in recorded["urls"]
    recorded = json.loads(path.read_text())
    assert recorded["env"] == {"TASKYARD_NAMESPACE": "ns"}
    assert recorded["urls"] == {"api": "http://x/"}
