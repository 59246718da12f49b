"""Stats collection: series in Redis, history in SQLite/PostgreSQL, rollup, retention, rates."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from taskyard.monitoring import history
from taskyard.monitoring.capture import Capture
from taskyard.monitoring.collect import TASK_NAME, collect
from taskyard.monitoring.store import StatsStore
from taskyard.runtime import runtime_of
from tests import servers


@pytest.fixture(params=["sqlite", "postgresql"])
def history_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A history database: a fresh SQLite file, or a fresh schema on the real PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'history.db'}"
        return
    servers.require("postgresql")
    schema = f"ty_stats_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(servers.POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in servers.POSTGRES_URL else "?"
    yield f"{servers.POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    for url in [u for u in history._engines if schema in u]:
        history._engines.pop(url).dispose()
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def test_rollup_and_retention(history_url: str) -> None:
    engine = history.engine_for(history_url)
    history.ensure_schema(engine)
    day = 86_400.0
    now = 100 * day
    rows = []
    # Two days ago: one snapshot every 10 s for 20 minutes = 4 rollup windows of 300 s.
    for i in range(120):
        rows.append(("queues", now - 2 * day + i * 10.0, {"n": i}))
    rows.append(("queues", now - 60.0, {"n": "recent"}))  # within the raw window: untouched
    rows.append(("queues", now - 40 * day, {"n": "ancient"}))  # beyond retention
    history.write_snapshots(engine, rows)
    deleted = history.rollup(engine, now, raw_keep_s=day, window_s=300.0)
    kept = history.read_snapshots(engine, "queues", now - 3 * day, now - day, 100, 0)
    assert len({int(s["at"] // 300) for s in kept}) == len(kept)  # one per window
    assert len(kept) == len({int((now - 2 * day + i * 10.0) // 300) for i in range(120)})
    assert deleted == 120 - len(kept)
    assert all(s["resolution_s"] == 300.0 for s in kept)
    # The last snapshot of each window is the one kept.
    last_in_window: dict[int, int] = {}
    for i in range(120):
        last_in_window[int((now - 2 * day + i * 10.0) // 300)] = i
    assert sorted(s["n"] for s in kept) == sorted(last_in_window.values())
    assert history.rollup(engine, now, raw_keep_s=day, window_s=300.0) == 0  # idempotent
    assert history.prune(engine, now, retention_s=30 * day) == 1
    remaining = history.read_snapshots(engine, "queues", None, None, 1000, 0)
    assert remaining[0]["n"] == "recent"
    assert "ancient" not in [s["n"] for s in remaining]


def test_collect_writes_series_and_history(
    make_app: Any, redis_client: redis.Redis, history_url: str
) -> None:
    app = make_app("stats", database_url=history_url, monitoring={"series_length": 10})
    runtime = runtime_of(app)
    store = StatsStore(runtime)
    capture = Capture(runtime)
    t0 = 1_000_000.0
    for i in range(15):
        capture.count("t.x", "normal", "received", 10)
        capture.finished("t.x", "normal", "succeeded", 0.02)
        for _ in range(9):
            capture.finished("t.x", "normal", "succeeded", 2.0)  # slow: over slow_task_s
        capture.flush()
        collect(runtime, now=t0 + 10.0 * i)
    # Redis keeps the newest 10, the history database all 15; series() joins them, no overlap.
    assert redis_client.llen(runtime.keys.series("overview")) == 10
    series = store.series("overview", None, None, 100, 0)
    assert [s["at"] for s in series] == [t0 + 10.0 * i for i in reversed(range(15))]
    page = store.series("overview", None, None, 4, 8)  # crosses from Redis into the database
    assert [s["at"] for s in page] == [t0 + 10.0 * i for i in (6, 5, 4, 3)]
    ranged = store.series("overview", t0 + 15.0, t0 + 45.0, 100, 0)
    assert [s["at"] for s in ranged] == [t0 + 40.0, t0 + 30.0, t0 + 20.0]
    old = store.series("throughput", t0, t0 + 20.0, 100, 0)
    assert [s["at"] for s in old] == [t0 + 20.0, t0 + 10.0, t0]
    # Rates come from counter deltas over the 10 s window: 10 finished per 10 s.
    assert old[0]["succeeded_per_s"] == pytest.approx(1.0)
    assert old[0]["received_per_s"] == pytest.approx(1.0)
    (per_task,) = old[0]["tasks"]
    assert (per_task["name"], per_task["per_s"], per_task["slow"]) == ("t.x", 1.0, 9)
    overview = store.overview()
    assert overview["throughput_per_s"] == pytest.approx(1.0)
    assert overview["totals"]["succeeded"] == 150
    assert 1.0 < overview["latency_window"]["runtime_p50"] <= 2.5
    # 9 of 10 runs were slow in every window: the slow-task-rate alert fires.
    firing = store.alerts()
    assert [a["alertname"] for a in firing] == ["SlowTaskRate"]
    assert firing[0]["value"] == pytest.approx(90.0)
    latency = store.series("latency", None, None, 1, 0)[0]
    assert 1.0 < latency["runtime_p50"] <= 2.5
    tasks = store.series("tasks", None, None, 1, 0)[0]["tasks"]
    assert tasks[0]["succeeded"] == 150


def test_unknown_series_is_rejected(make_app: Any) -> None:
    store = StatsStore(runtime_of(make_app("stats-bad")))
    with pytest.raises(ValueError, match="unknown series 'nope'"):
        store.series("nope", None, None, 10, 0)


def test_collect_task_is_single_flight(
    make_app: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    app = make_app(
        "stats-sf",
        database_url=f"sqlite:///{tmp_path / 'h.db'}",
        monitoring={"stats_interval_s": 3600},
    )
    task = app.tasks[TASK_NAME]
    assert app.amqp.router.route({}, TASK_NAME)["queue"].name == "critical"
    first = task.run()
    second = task.run()
    assert "series" in first
    assert second["skipped"] is True
    runtime = runtime_of(app)
    assert redis_client.llen(runtime.keys.series("overview")) == 1


def test_maintenance_reports_become_a_series(
    make_app: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    app = make_app("stats-mnt", database_url=f"sqlite:///{tmp_path / 'h.db'}")
    runtime = runtime_of(app)
    store = StatsStore(runtime)
    redis_client.set(runtime.keys.maintenance_last(), json.dumps({"run": 1, "ok": True}))
    collect(runtime, now=1000.0)
    collect(runtime, now=1010.0)  # same report: not recorded twice
    redis_client.set(runtime.keys.maintenance_last(), json.dumps({"run": 2, "ok": False}))
    collect(runtime, now=1020.0)
    assert [m["run"] for m in store.maintenance()] == [2, 1]


def test_redis_down_raises_clear_errors(make_app: Any, tmp_path: Path) -> None:
    app = make_app(
        "stats-down",
        redis_url="redis://127.0.0.1:1/0",
        database_url=f"sqlite:///{tmp_path / 'h.db'}",
        broker_connect_timeout_s=0.5,
    )
    store = StatsStore(runtime_of(app))
    calls = [
        store.queues,
        store.workers,
        store.tasks,
        store.histograms,
        store.alerts,
        store.overview,
        store.maintenance,
        lambda: store.series("queues", None, None, 5, 0),
    ]
    for call in calls:
        with pytest.raises(redis.ConnectionError):
            call()
    ready = store.check_ready()
    assert ready["database"] is None
    assert ready["redis"] and "ConnectionError" in ready["redis"]
    assert ready["broker"] and "ConnectionError" in ready["broker"]


def test_ready_reports_a_database_that_is_down(make_app: Any) -> None:
    app = make_app("stats-db-down", database_url="postgresql+psycopg2://postgres@127.0.0.1:1/none")
    ready = StatsStore(runtime_of(app)).check_ready()
    assert ready["redis"] is None and ready["broker"] is None
    assert ready["database"] and "OperationalError" in ready["database"]


def test_pg_stat_statements_only_where_installed(tmp_path: Path) -> None:
    from taskyard.monitoring.collect import _pg_stat_statements

    assert _pg_stat_statements(f"sqlite:///{tmp_path / 'x.db'}", 0.5) == []
    servers.require("postgresql")
    engine = sa.create_engine(servers.POSTGRES_URL)
    with engine.connect() as conn:
        installed = conn.execute(
            sa.text("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'")
        ).first()
    engine.dispose()
    rows = _pg_stat_statements(servers.POSTGRES_URL, 0.0)
    if installed is None:
        assert rows == []
    else:  # where the server preloads it, every row is a slow statement with its figures
        assert all({"query", "calls", "mean_s", "total_s"} <= set(r) for r in rows)


@pytest.mark.slow
def test_beat_runs_collection_on_a_worker(
    make_app: Any, redis_env: dict[str, str], tmp_path: Path
) -> None:
    from taskyard.testing import celery_worker, wait_until

    app = make_app("monitor", database_url=f"sqlite:///{tmp_path / 'h.db'}")
    runtime = runtime_of(app)
    store = StatsStore(runtime)
    env = {
        **redis_env,
        "TASKYARD_GUARD__ENABLED": "false",
        "TASKYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}",
        "TASKYARD_MONITORING__STATS_INTERVAL_S": "1",
        "TASKYARD_GUARD__HEARTBEAT_INTERVAL_S": "0.5",
    }
    with celery_worker(
        "tests.apps.monitor",
        "critical,normal",
        env,
        tmp_path,
        concurrency=1,
        name="beat",
        extra=("-B", "-s", str(tmp_path / "beat-schedule")),
    ):
        app.send_task("tests.apps.monitor.ok", args=(1,))

        def overview_len() -> int:
            return int(runtime.redis.llen(runtime.keys.series("overview")))

        wait_until(lambda: overview_len() >= 3, 30, 0.2, "three collections")
        latest = store.series("overview", None, None, 1, 0)[0]
    assert latest["workers_alive"] >= 1
    workers = store.series("workers", None, None, 1, 0)[0]["workers"]
    assert any(w["hostname"].startswith("beat@") and w["alive"] for w in workers)
    assert latest["totals"]["succeeded"] >= 1  # the ok task (and the collections themselves)
    history_rows = history.count_snapshots(
        history.engine_for(f"sqlite:///{tmp_path / 'h.db'}"), "overview"
    )
    assert history_rows >= 3


def test_maintenance_lists_the_run_history(
    make_app: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    from taskyard.maintenance import run_maintenance

    app = make_app("stats-mnt-db", database_url=f"sqlite:///{tmp_path / 'app.db'}")
    runtime = runtime_of(app)
    first = run_maintenance(runtime, dry_run=True)
    second = run_maintenance(runtime, dry_run=True)
    runs = StatsStore(runtime).maintenance()
    assert [r["run_id"] for r in runs[:2]] == [second.run_id, first.run_id]


def test_stats_cli_show_and_collect(
    make_app: Any, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from taskyard.cli import main

    monkeypatch.setenv("TASKYARD_REDIS_URL", servers.REDIS_URL)
    monkeypatch.setenv("TASKYARD_DATABASE_URL", f"sqlite:///{tmp_path / 'h.db'}")
    redis_client.lpush("high\x06\x166", b"{}", b"{}")
    runner = CliRunner()
    collected = runner.invoke(main, ["stats", "collect", "--json"])
    assert collected.exit_code == 0, collected.output
    assert "overview" in json.loads(collected.stdout)["series"]
    human = runner.invoke(main, ["stats", "collect"])
    assert human.exit_code == 0, human.output
    assert human.output.startswith("collection\n") and " UTC (" in human.output
    shown = runner.invoke(main, ["stats", "show", "--json"])
    assert shown.exit_code == 0, shown.output
    high = next(q for q in json.loads(shown.stdout)["queues"] if q["queue"] == "high")
    assert high["depth"] == 2
    table = runner.invoke(main, ["stats", "show"])
    assert table.exit_code == 0 and "high      2" in table.output
    monkeypatch.setenv("TASKYARD_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("TASKYARD_BROKER_CONNECT_TIMEOUT_S", "0.5")
    down = runner.invoke(main, ["stats", "show"])
    assert down.exit_code == 2 and "cannot reach Redis at redis://127.0.0.1:1/0" in down.output


def test_collect_reads_slow_statements_cache_and_batches(
    make_app: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """What the periodic-jobs and batching packages publish reaches the series and alerts."""
    from taskyard import batch_task
    from taskyard.cache.core import Cache
    from taskyard.database import engine

    app = make_app(
        "stats-sub",
        database_url=f"sqlite:///{tmp_path / 'app.db'}",
        maintenance={"slow_statement_s": 1e-9},  # every statement is "slow"
        monitoring={"alert_resolve_s": 0.0},
    )  # resolved by the next collection
    runtime = runtime_of(app)
    store = StatsStore(runtime)
    collect(runtime, now=1000.0)  # baseline: windows start here

    with engine(runtime).connect() as conn:  # the tasks' engine counts slow statements
        for _ in range(12):
            conn.execute(sa.text("SELECT 1"))
    cache = Cache(runtime)
    for i in range(30):
        cache.get("users", f"missing-{i}")
    cache.set("users", "present", 1)
    for _ in range(5):
        cache.get("users", "present")
    cache.flush_stats()

    @batch_task(batch_name="stats_sub_emails", batch_size=100, max_wait=600)
    def send(items: list[dict[str, int]]) -> None:
        return None

    for i in range(3):
        send.delay({"i": i})

    collect(runtime, now=1010.0)
    firing = {a["alertname"]: a for a in store.alerts()}
    assert firing["SlowQueries"]["labels"] == {"task": "-"}  # statements outside any task
    assert firing["SlowQueries"]["value"] >= 12
    assert firing["CacheHitRateLow"]["labels"] == {"namespace": "users"}
    assert firing["CacheHitRateLow"]["value"] == pytest.approx(100 * 5 / 35, abs=0.1)
    (batch,) = [
        b
        for b in store.series("batches", None, None, 1, 0)[0]["batches"]
        if b["batch_name"] == "stats_sub_emails"
    ]
    assert batch["buffered"] == 3
    slow = store.series("slow_statements", None, None, 1, 0)[0]["tasks"]
    assert next(s for s in slow if s["task"] == "-")["window_count"] >= 12

    collect(runtime, now=1020.0)  # no new slow statements in this window
    assert "SlowQueries" not in {a["alertname"] for a in store.alerts()}
