"""`taskyard dead` and `taskyard task` against real Redis and a real worker: list and search,
show, replay by filter (the replayed tasks run and link back), purge, batches beside tasks."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from taskyard.batching.buffer import BatchBuffer
from taskyard.cli import main
from taskyard.deadletters import DeadLetter, Query, RedisDeadLetterStore
from taskyard.runtime import runtime_of
from taskyard.testing import celery_worker, wait_until
from tests import servers
from tests.apps import dead as dead_app


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis) -> CliRunner:
    monkeypatch.setenv("TASKYARD_REDIS_URL", servers.REDIS_URL)
    return CliRunner()


def test_list_show_purge_and_batches(
    cli: CliRunner, make_app: Any, redis_client: redis.Redis
) -> None:
    app = make_app("deadcli")
    store = RedisDeadLetterStore.for_runtime(runtime_of(app))
    for i in range(4):
        store.record(
            DeadLetter(
                id=f"t{i}",
                reason="failed" if i % 2 else "crashed",
                name="bdc.send",
                queue="high",
                exception_type="ValueError",
                exception=f"bad {i}",
                traceback="Traceback: here",
            )
        )
    listed = cli.invoke(main, ["dead", "list", "--reason", "crashed"])
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines()[0] == "2 dead tasks"
    assert {line.split()[0] for line in listed.output.splitlines()[1:3]} == {"t0", "t2"}
    data = json.loads(cli.invoke(main, ["dead", "--json", "list", "--limit", "1"]).output)
    assert data["total"] == 4 and len(data["entries"]) == 1
    shown = cli.invoke(main, ["dead", "show", "t1"])
    assert "exception: bad 1" in shown.output and "Traceback: here" in shown.output
    assert cli.invoke(main, ["dead", "show", "nope"]).exit_code == 2
    bad = cli.invoke(main, ["dead", "list", "--reason", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output
    assert cli.invoke(main, ["dead", "purge"]).exit_code == 2  # ids, filters or --all
    purged = cli.invoke(main, ["dead", "purge", "--reason", "failed"])
    assert "purged 2 dead letters" in purged.output
    assert store.count() == 2 and store.count(Query(reason="failed")) == 0

    # A dead batch is listed beside the tasks, and purged through the same command.
    buffer = BatchBuffer(redis_client, runtime_of(app).keys, "alerts")
    buffer.register({"task": "x.alerts", "level": "batch", "lease_ms": 60_000})
    buffer.append("", ['{"n":1}'], batch_size=1, max_buffered=10, lease_ms=60_000)
    buffer.acquire("1", "tok", 60_000)
    buffer.fail("1", "tok", max_retries=0, backoff_ms=0, lease_ms=60_000, error="E: x")
    listed = cli.invoke(main, ["dead", "list"])
    assert "1 dead batches" in listed.output and "alerts/1" in listed.output
    assert '"batch_name": "alerts"' in cli.invoke(main, ["dead", "show", "alerts/1"]).output
    assert "purged 1 items" in cli.invoke(main, ["dead", "purge", "--batch", "alerts"]).output
    assert cli.invoke(main, ["dead", "purge", "--all"]).output.strip() == "purged 2 dead letters"


def test_since_takes_seconds_back_or_an_iso_time(cli: CliRunner, make_app: Any) -> None:
    app = make_app("deadcli")
    store = RedisDeadLetterStore.for_runtime(runtime_of(app))
    now = time.time()
    for i, age in enumerate((7200, 1800, 60)):
        store.record(DeadLetter(id=f"s{i}", reason="failed", name="bdc.send", last_at=now - age))

    def listed(*since: str) -> set[str]:
        out = cli.invoke(main, ["dead", "--json", "list", "--no-batches", *since])
        assert out.exit_code == 0, out.output
        return {e["id"] for e in json.loads(out.output)["entries"]}

    assert listed("--since", "3600") == {"s1", "s2"}
    hour_ago = datetime.fromtimestamp(now - 3600, UTC)
    assert listed("--since", hour_ago.isoformat()) == {"s1", "s2"}
    assert listed("--since", hour_ago.strftime("%Y-%m-%dT%H:%M:%SZ")) == {"s1", "s2"}
    # Without a zone, the local time the list prints.
    local = datetime.fromtimestamp(now - 600).strftime("%Y-%m-%d %H:%M:%S")
    assert listed("--since", local) == {"s2"}
    for bad, why in (("yesterday", "'yesterday' is neither"), ("-5", "0 or more")):
        out = cli.invoke(main, ["dead", "list", "--since", bad])
        assert out.exit_code == 2 and why in out.output, out.output
    # replay and purge take the same filter, and still refuse ids beside it.
    both = cli.invoke(main, ["dead", "purge", "s0", "--since", hour_ago.isoformat()])
    assert both.exit_code == 2 and "one of them" in both.output
    purged = cli.invoke(main, ["dead", "purge", "--since", hour_ago.isoformat()])
    assert purged.output.strip() == "purged 2 dead letters"
    assert [e.id for e in store.search()] == ["s0"]


@pytest.mark.slow
def test_replay_by_filter_runs_the_tasks_again(
    cli: CliRunner,
    make_app: Any,
    redis_env: dict[str, str],
    redis_client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKYARD_HISTORY_DATABASE_URL", f"sqlite:///{tmp_path / 'h.db'}")
    app = make_app("deadtest", include=["tests.apps.dead"], **dead_app.SETTINGS)
    store = RedisDeadLetterStore.for_runtime(runtime_of(app))
    with celery_worker("tests.apps.dead", "normal", redis_env, tmp_path, concurrency=1):
        first = [dead_app.boom.delay(f"r{i}") for i in range(3)]
        other = dead_app.flaky.delay("keep")
        wait_until(lambda: store.count() == 4, 60, 0.2, "four dead tasks")
        out = cli.invoke(main, ["dead", "replay", "--name", dead_app.boom.name])
        assert out.exit_code == 0, out.output
        assert "replayed 3 of 3 dead tasks" in out.output
        # They ran again (and died again, as boom does), each linked to the entry it came from.
        wait_until(
            lambda: store.count() == 4 and len([e for e in store.search() if e.replay_of]) == 3,
            60,
            0.2,
            "the replays dead again",
        )
    runs = [x.decode() for x in redis_client.lrange(dead_app.RAN, 0, -1)]
    assert sorted(r for r in runs if r.startswith("boom-")) == sorted(
        [f"boom-r{i}" for i in range(3)] * 2
    )
    originals = {r.id: store.get(r.id) for r in first}
    for entry in originals.values():
        assert entry is not None and entry.state == "replayed" and entry.replayed_as
        again = store.get(entry.replayed_as)
        assert again is not None and again.replay_of == entry.id and again.args == entry.args
    assert store.get(other.id) is not None and store.get(other.id).state == "dead"
    # Nothing is replayed twice.
    twice = cli.invoke(main, ["dead", "replay", originals[first[0].id].id])
    assert twice.exit_code == 2 and "already replayed" in twice.output
    timeline = cli.invoke(main, ["task", first[0].id])
    assert timeline.exit_code == 0 and "dead letter: failed" in timeline.output


@pytest.mark.slow
def test_unknown_task_replayed_once_deployed(
    cli: CliRunner,
    make_app: Any,
    redis_env: dict[str, str],
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    app = make_app("deadtest", include=["tests.apps.dead"], **dead_app.SETTINGS)
    store = RedisDeadLetterStore.for_runtime(runtime_of(app))
    before = {**redis_env, "DEAD_TEST_BEFORE_DEPLOY": "1"}
    with celery_worker("tests.apps.dead", "normal", before, tmp_path, concurrency=1):
        sent = app.send_task("tests.apps.dead.late", args=["x"], queue="normal")
        wait_until(lambda: store.get(sent.id) is not None, 30, 0.2, "the unknown task dead")
    entry = store.get(sent.id)
    assert entry is not None and entry.reason == "poison"
    assert entry.detail == "unknown task 'tests.apps.dead.late'"
    with celery_worker("tests.apps.dead", "normal", redis_env, tmp_path, concurrency=1):
        out = cli.invoke(main, ["dead", "replay", sent.id])
        assert out.exit_code == 0, out.output
        wait_until(
            lambda: "late-x" in [x.decode() for x in redis_client.lrange(dead_app.RAN, 0, -1)],
            30,
            0.2,
            "the replayed task to run",
        )
    replayed = store.get(sent.id)
    assert replayed is not None and replayed.state == "replayed"
    assert out.output.strip() == f"{sent.id} -> {replayed.replayed_as}"
