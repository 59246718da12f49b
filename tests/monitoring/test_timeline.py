"""Task timelines in the history database, on SQLite and PostgreSQL: events move from Redis in
order and once, a failed insert loses none, lookups merge moved and pending events, retention."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from taskyard.monitoring import history, timeline
from taskyard.runtime import runtime_of
from tests import servers


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.engine.Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'history.db'}"
    else:
        servers.require("postgresql")
        url = servers.POSTGRES_URL
    engine = history.engine_for(url)
    history.ensure_schema(engine)
    yield engine


@pytest.fixture
def prefix() -> Iterator[str]:
    """Task ids of this test only (the PostgreSQL database is shared); deleted afterwards."""
    mark = f"tl-{uuid.uuid4().hex[:8]}-"
    yield mark
    for url in list(history._engines):
        try:
            with history.engine_for(url).begin() as conn:
                conn.execute(
                    history.task_events.delete().where(
                        history.task_events.c.task_id.like(mark + "%")
                    )
                )
        except (sa.exc.OperationalError, sa.exc.ProgrammingError):
            # An engine other tests made on purpose for a database that is down, or one whose
            # database never got the history schema (nothing of this test is there).
            continue


def test_drain_lookup_and_prune(
    make_app: Any, engine: sa.engine.Engine, prefix: str, redis_client: redis.Redis
) -> None:
    runtime = runtime_of(make_app("tl", namespace=prefix.rstrip("-")))
    key = runtime.keys.timeline_pending()
    now = time.time()
    a, b = prefix + "a", prefix + "b"
    redis_client.rpush(
        key,
        *[
            timeline.pack(a, now + i, event, "app.t" * 80, "high", "w")
            for i, event in enumerate(
                ("sent", "received", "started", "retried", "started", "failed", "dead")
            )
        ],
    )
    redis_client.rpush(key, timeline.pack(b, now, "sent", "app.u", "low", ""), b"garbage")
    assert timeline.drain(runtime, engine) == 8
    assert redis_client.llen(key) == 0
    redis_client.rpush(key, timeline.pack(b, now + 1, "received", "app.u", "low", "w2"))
    found = timeline.lookup(runtime, engine, a)
    assert found is not None and found["state"] == "dead" and len(found["name"]) == 255
    assert found["counts"]["started"] == 2 and found["counts"]["retried"] == 1
    merged = timeline.lookup(runtime, engine, b)  # one moved, one still pending
    assert merged is not None and [e["event"] for e in merged["events"]] == ["sent", "received"]
    assert timeline.lookup(runtime, engine, prefix + "none") is None
    assert timeline.prune(engine, now + 3600, 600) >= 8
    assert timeline.lookup(runtime, None, a) is None


def test_a_failed_insert_keeps_the_events(
    make_app: Any, prefix: str, tmp_path: Path, redis_client: redis.Redis
) -> None:
    runtime = runtime_of(make_app("tl", namespace=prefix.rstrip("-")))
    key = runtime.keys.timeline_pending()
    events = [timeline.pack(prefix + str(i), time.time(), "sent", "n", "q", "") for i in range(5)]
    redis_client.rpush(key, *events)
    broken = sa.create_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    with pytest.raises(sa.exc.OperationalError):
        timeline.drain(runtime, broken)
    assert [e.decode() for e in redis_client.lrange(key, 0, -1)] == events  # order kept
