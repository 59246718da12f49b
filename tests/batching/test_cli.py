"""`taskyard batches`: the table, JSON, dead letters, requeue and purge, against real Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from taskyard import batch_task
from taskyard.batching.buffer import BatchBuffer
from taskyard.cli import main
from taskyard.runtime import runtime_of
from tests import servers


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis) -> CliRunner:
    monkeypatch.setenv("TASKYARD_REDIS_URL", servers.REDIS_URL)
    return CliRunner()


def test_batches_table_json_dead_requeue_purge(
    cli: CliRunner, make_app: Any, redis_client: redis.Redis
) -> None:
    app = make_app("clitest")

    @batch_task(batch_name="alerts", batch_size=2, max_wait=60, key=lambda item: item["ch"])
    def alerts(items: list[Any]) -> None: ...

    alerts.add_many(
        [
            {"ch": "sms", "n": 1},
            {"ch": "sms", "n": 2},
            {"ch": "mail", "n": 3},
            {"ch": "sms", "n": 4},
        ]
    )
    out = cli.invoke(main, ["batches"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[:4] == ["batch", "key", "buffered", "oldest"]
    assert lines[1].split()[:3] == ["alerts", "(all)", "2"]
    assert {line.split()[0] for line in lines[2:]} == {"mail", "sms"}

    data = json.loads(cli.invoke(main, ["batches", "--json"]).output)
    assert data[0]["batch_name"] == "alerts" and data[0]["in_flight"] == 1

    buffer = BatchBuffer(redis_client, runtime_of(app).keys, "alerts")
    buffer.acquire("1", "t", 60_000)
    buffer.fail("1", "t", max_retries=0, backoff_ms=0, lease_ms=60_000, error="ValueError: x")
    dead = cli.invoke(main, ["batches", "dead", "alerts"])
    assert "alerts/1 key=sms items=2 attempts=1: ValueError: x" in dead.output

    assert cli.invoke(main, ["batches", "requeue", "alerts"]).exit_code == 2  # ids or --all
    requeued = cli.invoke(main, ["batches", "requeue", "alerts", "--all"])
    assert requeued.exit_code == 0 and "requeued 1 batches of alerts: 1" in requeued.output
    unknown = cli.invoke(main, ["batches", "requeue", "nope", "--all"])
    assert unknown.exit_code == 2 and "'nope' is unknown" in unknown.output  # a user error

    buffer.acquire("1", "u", 60_000)
    buffer.fail("1", "u", max_retries=0, backoff_ms=0, lease_ms=60_000, error="again")
    purged = cli.invoke(main, ["batches", "purge", "alerts", "1"])
    assert "purged 2 items" in purged.output
    assert cli.invoke(main, ["batches", "dead"]).output.strip() == "no dead batches"
