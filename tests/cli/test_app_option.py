"""`-A` is taken wherever it is placed: before the command, after the group, after the
subcommand (it used to go before the subcommand for `dead` and `batches`, after it for `stats`)."""

from __future__ import annotations

import pytest
import redis
from click.testing import CliRunner

from taskyard.cli import main

PLACEMENTS = [
    ["-A", "nope.app", "dead", "list"],
    ["dead", "-A", "nope.app", "list"],
    ["dead", "list", "-A", "nope.app"],
    ["-A", "nope.app", "batches", "dead"],
    ["batches", "dead", "-A", "nope.app"],
    ["-A", "nope.app", "stats", "show"],
    ["stats", "-A", "nope.app", "show"],
    ["stats", "show", "-A", "nope.app"],
    ["-A", "nope.app", "limits", "show"],
    ["cache", "-A", "nope.app", "stats"],
]


@pytest.mark.parametrize("argv", PLACEMENTS, ids=lambda argv: " ".join(argv))
def test_the_app_is_found_wherever_it_is_placed(
    argv: list[str], redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import servers

    monkeypatch.setenv("TASKYARD_REDIS_URL", servers.REDIS_URL)
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert "cannot load app 'nope.app'" in result.output
