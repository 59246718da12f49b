"""The buffered batch producer against real Redis: durability after flush, the exit and fork
paths, a full buffer found on flush, errors reported, Redis unreachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import redis

from taskyard import BatchBufferFull, BatchItemError, ConfigurationError, batch_task
from taskyard.batching import inspect_batches
from taskyard.devstack.supervisor import free_port
from taskyard.errors import BufferUnavailable
from taskyard.runtime import runtime_of
from taskyard.testing import ROOT, child_env, wait_until
from tests import servers


def _all_items(client: redis.Redis, app: Any, name: str) -> list[Any]:
    """Every item of a batch name in Redis: buffered (every group) and claimed batches."""
    keys = runtime_of(app).keys
    prefix = keys.batch_prefix(name)
    out: list[Any] = []
    for key in client.scan_iter(match=f"{prefix}*"):
        text = key.decode()
        if text.startswith(prefix + "buf:") or text.startswith(prefix + "items:"):
            out.extend(json.loads(x) for x in client.lrange(key, 0, -1))
    return out


def test_items_are_durable_when_flush_returns(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("buf1")

    @batch_task(batch_name="fast", batch_size=100, max_wait=60, linger_ms=50)
    def fast(items: list[Any]) -> None: ...

    for i in range(1234):
        assert fast.delay({"i": i}).accepted == 1
    producer = fast.buffered()
    assert producer.pending > 0  # a 50 ms linger: not all appended yet
    assert producer.flush() >= 0
    assert producer.pending == 0
    assert sorted(item["i"] for item in _all_items(redis_client, app, "fast")) == list(range(1234))
    # Full batches were claimed and published by the background appends, as add_many does.
    [state] = inspect_batches(app)
    assert state["in_flight"] == 12 and state["buffered"] == 34 and state["pending"] == 1234
    assert producer.appended == 1234 and producer.rejected == 0


def test_the_linger_appends_without_a_flush(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("buf2")

    @batch_task(batch_name="linger", batch_size=10, max_wait=60, linger_ms=5)
    def linger(items: list[Any]) -> None: ...

    for i in range(25):
        linger.delay(i)
    wait_until(
        lambda: len(_all_items(redis_client, app, "linger")) == 25,
        5,
        message="the background thread to append every item",
    )


def test_context_manager_flushes_on_exit(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("buf3")

    @batch_task(batch_name="ctx", batch_size=1000, max_wait=60)
    def ctx(items: list[Any]) -> None: ...

    with ctx.buffered(linger_ms=1000) as buf:
        for i in range(300):
            buf.delay({"i": i})
        assert len(_all_items(redis_client, app, "ctx")) < 300
    assert len(_all_items(redis_client, app, "ctx")) == 300
    # Plain .delay of the same batch stays durable on return.
    ctx.delay({"i": 300})
    assert len(_all_items(redis_client, app, "ctx")) == 301


def test_bad_items_raise_in_the_caller_at_once(make_app: Any) -> None:
    make_app("buf4")

    @batch_task(batch_name="strict", batch_size=10, max_item_bytes=64, linger_ms=5)
    def strict(items: list[Any]) -> None: ...

    with pytest.raises(BatchItemError, match="not JSON-encodable"):
        strict.delay({"when": object()})
    with pytest.raises(BatchItemError, match="max_item_bytes=64"):
        strict.delay("x" * 100)
    assert strict.buffered().pending == 0


@pytest.mark.parametrize("value", [-1, "5", 20_000, True])
def test_linger_ms_is_checked_at_decoration(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="linger_ms="):
        batch_task(batch_name="x", linger_ms=value)(lambda items: None)


def test_a_full_buffer_found_in_the_background_is_raised_by_flush(
    make_app: Any, redis_client: redis.Redis
) -> None:
    make_app("buf5")

    @batch_task(batch_name="capped", batch_size=5, max_wait=60, max_buffered=10, linger_ms=1)
    def capped(items: list[Any]) -> None: ...

    producer = capped.buffered()
    for i in range(10):
        capped.delay(i)
    producer.flush()  # 10 accepted: the limit
    for i in range(10, 13):
        capped.delay(i)
    with pytest.raises(BatchBufferFull) as info:
        producer.flush()
    assert info.value.limit == 10 and info.value.buffered == 10
    # Sequence numbers of the refused items: the 11th to 13th delay() on this producer.
    assert info.value.accepted == 0 and info.value.rejected == (10, 11, 12)
    assert producer.rejected == 3 and producer.appended == 10
    producer.flush()  # reported once


def test_redis_unreachable_keeps_the_items_and_flush_raises(
    make_app: Any, redis_client: redis.Redis
) -> None:
    with_free_port = free_port()
    down = make_app(
        "buf6", redis_url=f"redis://127.0.0.1:{with_free_port}/0", broker_connect_timeout_s=0.2
    )

    @batch_task(batch_name="down", batch_size=5, max_wait=60, linger_ms=1, app=down)
    def down_batch(items: list[Any]) -> None: ...

    for i in range(7):
        down_batch.delay(i)
    producer = down_batch.buffered()
    with pytest.raises(BufferUnavailable):
        producer.flush()
    assert producer.pending == 7  # nothing dropped
    assert producer.unavailable >= 1
    producer._pending.clear()  # this Redis never comes back: keep the exit hook quiet


_SCRIPT = """
import os, sys
from taskyard import batch_task, create_app
app = create_app("bufexit", redis_url=os.environ["URL"])

@batch_task(batch_name="exiting", batch_size=1000, max_wait=60, linger_ms=2000)
def exiting(items): ...

for i in range(int(sys.argv[1])):
    exiting.delay({"i": i, "pid": os.getpid()})
{tail}
"""


def _run(tail: str, n: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT.replace("{tail}", tail), str(n)],
        env=child_env({"URL": servers.REDIS_URL}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_process_that_exits_without_flushing_loses_nothing(
    make_app: Any, redis_client: redis.Redis
) -> None:
    app = make_app("bufexit")
    # A 2 s linger: the process returns long before the background thread would append.
    done = _run("", 5000)
    assert done.returncode == 0, done.stderr
    items = _all_items(redis_client, app, "exiting")
    assert sorted(item["i"] for item in items) == list(range(5000))


def test_a_forked_child_starts_empty_and_the_parent_keeps_its_items(
    make_app: Any, redis_client: redis.Redis
) -> None:
    app = make_app("bufexit")
    tail = """
exiting.buffered().flush()
for i in range(100, 110):
    exiting.delay({"i": i, "pid": os.getpid()})  # held by the parent at fork time
pid = os.fork()
if pid == 0:
    producer = exiting.buffered()
    assert producer.pending == 0, producer.pending
    for i in range(200, 205):
        exiting.delay({"i": i, "pid": os.getpid()})
    producer.flush()
    sys.exit(0)  # atexit runs in the child too: it must not append the parent's items
os.waitpid(pid, 0)
"""
    done = _run(tail, 100)
    assert done.returncode == 0, done.stderr
    items = _all_items(redis_client, app, "exiting")
    numbers = sorted(item["i"] for item in items)
    assert numbers == [*range(100), *range(100, 110), *range(200, 205)]  # none twice
    parent = {item["pid"] for item in items if item["i"] < 200}
    child = {item["pid"] for item in items if item["i"] >= 200}
    assert len(parent) == 1 and len(child) == 1 and parent != child
    assert os.getpid() not in parent


def test_errors_at_exit_are_reported(make_app: Any, redis_client: redis.Redis) -> None:
    script = """
import os
from taskyard import batch_task, create_app
app = create_app("bufexit2", redis_url=os.environ["URL"], broker_connect_timeout_s=0.2)

@batch_task(batch_name="lost", batch_size=10, max_wait=60, linger_ms=2000)
def lost(items): ...

for i in range(3):
    lost.delay(i)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=child_env({"URL": f"redis://127.0.0.1:{free_port()}/0"}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "3 buffered items not appended at exit" in done.stderr, done.stderr


def test_threads_share_one_producer_and_lose_nothing(
    make_app: Any, redis_client: redis.Redis
) -> None:
    import threading

    app = make_app("buf7")

    @batch_task(batch_name="threads", batch_size=50, max_wait=60, linger_ms=2)
    def threads(items: list[Any]) -> None: ...

    def produce(base: int) -> None:
        for i in range(2000):
            threads.delay({"i": base + i})

    workers = [threading.Thread(target=produce, args=(k * 10_000,)) for k in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    threads.buffered().flush()
    got = sorted(item["i"] for item in _all_items(redis_client, app, "threads"))
    assert got == sorted(k * 10_000 + i for k in range(4) for i in range(2000))


def test_manual_flush_takes_the_held_items_too(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("buf8")

    @batch_task(batch_name="manual", batch_size=100, max_wait=60, linger_ms=5000)
    def manual(items: list[Any]) -> None: ...

    for i in range(7):
        manual.delay(i)
    result = manual.flush()  # claims what is buffered, this process's held items included
    assert len(result.batch_ids) == 1
    [state] = inspect_batches(app)
    assert state["in_flight"] == 1 and state["pending"] == 7
    time.sleep(0)  # nothing left for the thread
    assert manual.buffered().pending == 0


def test_items_from_several_threads_are_appended_without_a_flush(
    make_app: Any, redis_client: redis.Redis
) -> None:
    import threading

    app = make_app("buf9")

    @batch_task(batch_name="woken", batch_size=1000, max_wait=60, linger_ms=2)
    def woken(items: list[Any]) -> None: ...

    start = threading.Barrier(4)

    def produce(base: int) -> None:
        start.wait()  # all four append into the empty buffer at once
        for i in range(500):
            woken.delay({"i": base + i})

    workers = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    # No flush: the background thread alone must take every item, whoever appended first.
    wait_until(
        lambda: len(_all_items(redis_client, app, "woken")) == 2000,
        10,
        message="the background thread to append 2,000 items",
    )
