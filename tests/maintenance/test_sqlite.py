"""Index maintenance on a real SQLite file with the example app's models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from examples.bdc.models import Base
from sqlalchemy import create_engine, text

from taskyard.errors import ConfigurationError
from taskyard.maintenance import last_report, recent_runs, run_maintenance
from taskyard.runtime import runtime_of

DROPPED = ["ix_appointments_upcoming_scheduled", "ix_users_role_is_active", "ix_users_email"]


def _setup(tmp_path: Path, make_app: Any, **overrides: Any) -> tuple[Any, str]:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        for name in DROPPED:
            conn.execute(text(f'DROP INDEX "{name}"'))
    engine.dispose()
    overrides.setdefault("maintenance", {"metadata": "examples.bdc.models:Base.metadata"})
    app = make_app(
        "maint-sqlite",
        database_url=url,
        history_database_url=f"sqlite:///{tmp_path / 'history.db'}",
        **overrides,
    )
    return runtime_of(app), url


def _indexes(url: str) -> dict[str, str]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
        found = {name: sql or "" for name, sql in rows}
    engine.dispose()
    return found


def test_creates_missing_indexes_including_partial(tmp_path: Path, make_app: Any) -> None:
    runtime, url = _setup(tmp_path, make_app)
    assert not set(DROPPED) & set(_indexes(url))
    report = run_maintenance(runtime)
    assert report.status == "ok", report.errors
    found = _indexes(url)
    assert set(DROPPED) <= set(found)
    assert "WHERE status = 'scheduled'" in found["ix_appointments_upcoming_scheduled"]
    kinds = [a.kind for a in report.actions]
    assert kinds.count("create") == 3 and "optimize" in kinds and "check" in kinds
    assert report.findings["quick_check"] == ["ok"]
    assert all(a.status == "done" for a in report.actions)
    # A second run finds nothing missing.
    again = run_maintenance(runtime)
    assert [a for a in again.actions if a.kind == "create"] == []
    runs = recent_runs(runtime)
    assert [r["status"] for r in runs] == ["ok", "ok"]
    assert runs[1]["report"]["actions"][0]["kind"] == "create"
    assert last_report(runtime)["run_id"] == again.run_id  # type: ignore[index]


def test_dry_run_changes_nothing(tmp_path: Path, make_app: Any) -> None:
    runtime, url = _setup(tmp_path, make_app)
    before = _indexes(url)
    printed: list[str] = []
    report = run_maintenance(runtime, dry_run=True, echo=printed.append)
    assert _indexes(url) == before
    assert report.dry_run and all(a.status == "planned" for a in report.actions)
    assert any(
        line.startswith("CREATE INDEX ix_appointments_upcoming_scheduled")
        and "WHERE status = 'scheduled'" in line
        for line in printed
    )
    assert recent_runs(runtime)[0]["dry_run"] is True


def test_unknown_metadata_path_names_the_setting(tmp_path: Path, make_app: Any) -> None:
    for i, path in enumerate(
        [
            "examples.bdc.nothing:Base.metadata",
            "examples.bdc.models:Nope",
            "examples.bdc.models",
            "examples.bdc.models:Base",
        ]
    ):
        (tmp_path / str(i)).mkdir()
        runtime, _ = _setup(tmp_path / str(i), make_app, maintenance={"metadata": path})
        with pytest.raises(ConfigurationError) as info:
            run_maintenance(runtime)
        assert info.value.setting == "TASKYARD_MAINTENANCE__METADATA"
        assert path in str(info.value)


def test_unreachable_database_is_recorded_failed(tmp_path: Path, make_app: Any) -> None:
    app = make_app(
        "maint-sqlite",
        database_url=f"sqlite:///{tmp_path}/missing/dir/app.db",
        history_database_url=f"sqlite:///{tmp_path / 'history.db'}",
        maintenance={"metadata": "examples.bdc.models:Base.metadata"},
    )
    report = run_maintenance(runtime_of(app))
    assert report.status == "failed"
    assert "unable to open database file" in (report.reason or "")
    assert recent_runs(runtime_of(app))[0]["status"] == "failed"
