"""The dead-letter store: the Redis store and its in-memory twin behave alike (merge, bounds,
search, replay marks, purge, gauge counts)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from taskyard.deadletters import DeadLetter, MemoryDeadLetterStore, Query, RedisDeadLetterStore
from taskyard.deadletters.entry import cap, to_json_text
from taskyard.errors import DeadLetterError
from taskyard.keys import Keys


@pytest.fixture(params=["redis", "memory"])
def make_store(request: pytest.FixtureRequest) -> Iterator[Any]:
    def factory(max_entries: int = 100, retention_s: float = 30 * 86_400.0) -> Any:
        if request.param == "memory":
            return MemoryDeadLetterStore(max_entries=max_entries, retention_s=retention_s)
        client = request.getfixturevalue("redis_client")
        return RedisDeadLetterStore(
            client, Keys("t"), max_entries=max_entries, retention_s=retention_s
        )

    yield factory


NOW = round(time.time(), 3)


def entry(i: int, **fields: Any) -> DeadLetter:
    base: dict[str, Any] = {
        "name": f"app.t{i % 3}",
        "queue": "normal",
        "reason": "failed",
        "exception_type": "ValueError",
        "last_at": NOW - 100 + i,
    }
    base.update(fields)
    return DeadLetter(id=f"id-{i}", **base)


def test_record_get_and_merge(make_store: Any) -> None:
    store = make_store()
    first = entry(1, first_at=1000.0, args='[1,"x"]', kwargs='{"k":2}', headers={"a": 1})
    store.record(first)
    got = store.get("id-1")
    assert got is not None and got.args == '[1,"x"]' and got.headers == {"a": 1}
    assert got.first_at == 1000.0 and got.times == 1
    store.record(entry(1, first_at=2000.0, exception_type="KeyError"))
    again = store.get("id-1")
    assert again is not None and again.first_at == 1000.0 and again.times == 2
    assert again.exception_type == "KeyError"
    assert store.search(Query(exception_type="ValueError")) == []
    assert [e.id for e in store.search(Query(exception_type="KeyError"))] == ["id-1"]
    assert store.get("missing") is None


def test_search_by_each_field_newest_first(make_store: Any) -> None:
    store = make_store()
    for i in range(12):
        store.record(
            entry(i, queue="low" if i % 2 else "high", reason="crashed" if i % 4 == 0 else "failed")
        )
    assert [e.id for e in store.search(limit=3)] == ["id-11", "id-10", "id-9"]
    assert {e.id for e in store.search(Query(name="app.t0"))} == {"id-0", "id-3", "id-6", "id-9"}
    assert {e.id for e in store.search(Query(queue="low", reason="crashed"))} == set()
    assert {e.id for e in store.search(Query(queue="high", reason="crashed"))} == {
        "id-0",
        "id-4",
        "id-8",
    }
    window = store.search(Query(since=NOW - 100 + 3, until=NOW - 100 + 5))
    assert [e.id for e in window] == ["id-5", "id-4", "id-3"]
    assert store.count(Query(queue="low")) == 6
    assert [e.id for e in store.search(Query(queue="low"), limit=2, offset=2)] == ["id-7", "id-5"]


def test_count_and_age_bounds(make_store: Any) -> None:
    store = make_store(max_entries=5, retention_s=50.0)
    for i in range(8):
        store.record(entry(i, last_at=time.time() - 10 + i))
    assert [e.id for e in store.search()] == ["id-7", "id-6", "id-5", "id-4", "id-3"]
    store.record(entry(100, last_at=time.time() - 60))  # older than the retention: trimmed
    assert store.get("id-100") is None or store.trim() >= 1
    assert store.get("id-100") is None
    # One clock reading for the trim and the check: two readings raced an entry at the cutoff.
    later = time.time() + 45
    assert store.trim(now=later) == 5 - sum(1 for e in store.search() if e.last_at >= later - 50)
    assert sum(store.counts().values()) == store.count()


def test_replay_mark_purge_and_gauge(make_store: Any) -> None:
    store = make_store()
    for i in range(6):
        store.record(entry(i))
    assert store.counts() == {
        ("normal", "app.t0", "failed"): 2,
        ("normal", "app.t1", "failed"): 2,
        ("normal", "app.t2", "failed"): 2,
    }
    assert store.mark_replayed("id-0", "new-0")
    assert not store.mark_replayed("id-0", "new-again")  # once only
    assert not store.mark_replayed("missing", "x")
    marked = store.get("id-0")
    assert marked is not None and marked.state == "replayed" and marked.replayed_as == "new-0"
    assert store.counts()[("normal", "app.t0", "failed")] == 1
    assert "id-0" not in {e.id for e in store.search()}
    assert {e.id for e in store.search(Query(state="replayed"))} == {"id-0"}
    assert store.count(Query(state=None)) == 6
    assert store.purge(Query(name="app.t1")) == 2
    assert store.count() == 3
    assert store.delete(["id-2", "nope"]) == 1
    assert store.purge(Query(state=None)) == 3
    assert store.count(Query(state=None)) == 0 and store.counts() == {}


def test_bad_values_are_named() -> None:
    with pytest.raises(DeadLetterError, match=r"reason='nope'.*failed, crashed, poison, expired"):
        Query(reason="nope")
    with pytest.raises(DeadLetterError, match="state='x'"):
        Query(state="x")
    with pytest.raises(DeadLetterError, match="since="):
        Query(since=10, until=5)
    with pytest.raises(DeadLetterError, match="reason="):
        DeadLetter(id="a", reason="bad")


def test_caps() -> None:
    text, cut = cap("x" * 100, 20)
    assert cut and len(text) == 20 and text.endswith("[truncated]")
    assert to_json_text([1, 2], 100) == ("[1,2]", True)
    assert to_json_text([object()], 1000)[1] is False  # a repr cannot be replayed
    assert to_json_text(["y" * 500], 100)[1] is False


def test_redis_keys_share_one_hash_tag(redis_client: redis.Redis) -> None:
    store = RedisDeadLetterStore(redis_client, Keys("t"), max_entries=10, retention_s=30 * 86_400)
    store.record(entry(1))
    keys = [k.decode() for k in redis_client.keys("*")]
    assert keys and all(k.startswith("{t:dead}:") for k in keys)
    store.delete(["id-1"])
    # Entry, indexes and gauge go together: nothing is left behind.
    assert redis_client.keys("*") == []
