"""Warmer registry, the warm job's single flight and report, the CLI commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from taskyard.beat import Scheduler
from taskyard.cache import warming
from taskyard.cache.core import Cache, cache_for
from taskyard.cli import main
from taskyard.errors import ConfigurationError
from taskyard.maintenance import periodic_run
from taskyard.runtime import runtime_of
from tests import servers


@pytest.fixture
def warmers() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        warming.unregister(name)


def test_registry_rejects_bad_and_clashing_names(warmers: list[str]) -> None:
    with pytest.raises(ConfigurationError):
        warming.cache_warmer("")

    @warming.cache_warmer("t_clash")
    def first(cache: Cache) -> int:
        return 0

    warmers.append("t_clash")
    with pytest.raises(ConfigurationError, match="already registered"):

        @warming.cache_warmer("t_clash")
        def second(cache: Cache) -> int:
            return 0


def test_warm_job_runs_once_per_period_and_reports(make_app: Any, warmers: list[str]) -> None:
    app = make_app("warm-test")
    runtime = runtime_of(app)

    @warming.cache_warmer("t_ok")
    def ok(cache: Cache) -> int:
        for i in range(3):
            cache.set("t", f"k{i}", i)
        return 3

    @warming.cache_warmer("t_broken")
    def broken(cache: Cache) -> int:
        raise RuntimeError("database is down")

    warmers.extend(["t_ok", "t_broken"])
    report = app.tasks["taskyard.cache.warm"].apply(kwargs={"trigger": "test"}).get()
    entries = {w["name"]: w for w in report["warmers"]}
    assert entries["t_ok"]["keys"] == 3 and entries["t_ok"]["error"] is None
    assert "database is down" in entries["t_broken"]["error"]
    assert report["errors"] >= 1 and report["keys"] >= 3 and report["duration_s"] >= 0
    assert warming.last_warm_report(runtime)["trigger"] == "test"  # type: ignore[index]
    assert cache_for(app).get("t", "k2") == 2
    again = app.tasks["taskyard.cache.warm"].apply().get()
    assert again["skipped"] is True and again["reason"] == "period-taken"
    with pytest.raises(ConfigurationError, match="unknown cache warmer"):
        warming.run_warmers(runtime, ["nope"])


def test_maintenance_job_single_flight(make_app: Any, tmp_path: Path) -> None:
    app = make_app(
        "maint-job",
        database_url=f"sqlite:///{tmp_path / 'a.db'}",
        maintenance={"metadata": "examples.bdc.models:Base.metadata"},
    )
    runtime = runtime_of(app)
    first = periodic_run(runtime)
    assert first["skipped"] is False and first["status"] == "ok"
    assert periodic_run(runtime)["skipped"] is True
    bad = make_app(
        "maint-job",
        database_url=f"sqlite:///{tmp_path / 'b.db'}",
        maintenance={"metadata": "nowhere:md"},
        namespace="other",
    )
    failed = periodic_run(runtime_of(bad))
    assert failed["status"] == "failed" and "TASKYARD_MAINTENANCE__METADATA" in failed["reason"]


def test_scheduler_leaves_out_unregistered_platform_tasks(make_app: Any, tmp_path: Path) -> None:
    app = make_app("sched-test")
    scheduler = Scheduler(app=app, schedule_filename=str(tmp_path / "beat"), lazy=True)
    scheduler._store = {"entries": {}}
    entries = dict(app.conf.beat_schedule)
    entries["taskyard.not.there"] = {"task": "taskyard.not.there", "schedule": 5.0}
    scheduler.merge_inplace(entries)
    assert "taskyard.cache.warm" in scheduler.schedule
    assert "taskyard.maintenance.run" in scheduler.schedule
    assert "taskyard.not.there" not in scheduler.schedule


def test_cli_maintenance_and_cache(tmp_path: Path, redis_client: Any) -> None:
    servers.require("redis")
    env = {
        "TASKYARD_REDIS_URL": servers.REDIS_URL,
        "TASKYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "TASKYARD_HISTORY_DATABASE_URL": f"sqlite:///{tmp_path / 'hist.db'}",
        "TASKYARD_MAINTENANCE__METADATA": "examples.bdc.models:Base.metadata",
    }
    runner = CliRunner()
    from examples.bdc.models import Base
    from sqlalchemy import create_engine

    engine = create_engine(env["TASKYARD_DATABASE_URL"])
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_evaluations_pending")
    engine.dispose()
    dry = runner.invoke(main, ["maintenance", "run", "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert (
        "CREATE INDEX ix_evaluations_pending ON evaluations (due_date) WHERE status = "
        "'pending';" in dry.output
    )
    real = runner.invoke(main, ["maintenance", "run", "--json"], env=env)
    assert real.exit_code == 0, real.output
    assert json.loads(real.stdout)["actions"][0]["status"] == "done"
    bad = runner.invoke(
        main, ["maintenance", "run"], env={**env, "TASKYARD_MAINTENANCE__METADATA": "nowhere:md"}
    )
    assert bad.exit_code == 2 and "TASKYARD_MAINTENANCE__METADATA" in bad.output

    app = __import__("taskyard").create_app("cli-cache", redis_url=servers.REDIS_URL)
    cache = cache_for(app)
    for i in range(30):
        cache.set("user", f"u{i}", i, tags=["cli-tag"] if i % 3 == 0 else [])
    cleared = runner.invoke(main, ["cache", "clear", "--tag", "cli-tag"], env=env)
    assert cleared.exit_code == 0, cleared.output
    assert "10 entries deleted" in cleared.output
    stats = runner.invoke(main, ["cache", "stats"], env=env)
    assert stats.exit_code == 0
