"""Batching: enqueue rates and end-to-end items/s, ``@batch_task`` beside plain Celery.

Plain Celery is ``celery.Celery`` with its default settings and the broker on the benchmark
Redis, one task per item. Both workers run one process of concurrency 2 (prefork). The apps are
defined here so the workers can load them with ``-A benchmarks.bench_batching:<app>``. The
taskyard app runs without resource guards: on a shared, busy machine they would hold batches back
(that is their job) and the comparison with plain Celery, which has none, would measure them.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from benchmarks.common import BENCH_REDIS_URL, Result
from taskyard import batch_task, create_app
from taskyard.testing import celery_worker, wait_until

# BENCH_BATCHING_REDIS_URL moves this benchmark off the shared benchmark database, so it can run
# beside another benchmark that flushes that database (the workers inherit the variable).
REDIS_URL = os.environ.get("BENCH_BATCHING_REDIS_URL", BENCH_REDIS_URL)
ENV = {"TASKYARD_REDIS_URL": REDIS_URL}
DONE = "bench:batch:done"

plain_app = Celery("bench-batch-plain", broker=REDIS_URL)
# Created last: it is the current app, the one batch tasks' .delay() uses in this process.
app = create_app("bench-batching", redis_url=REDIS_URL, guard={"enabled": False})
_redis = redis.Redis.from_url(REDIS_URL)


@plain_app.task(name="bench.batch.item")
def plain_item(item: dict[str, Any]) -> None:
    _redis.incr(DONE)


@batch_task(
    batch_name="bench",
    batch_size=100,
    max_wait=0.5,
    max_buffered=10_000_000,
    name="bench.batch.sink",
)
def sink(items: list[dict[str, Any]]) -> None:
    _redis.incrby(DONE, len(items))


def _item(i: int) -> dict[str, Any]:
    return {"user_id": i, "channel": "email", "template": "digest"}


def _rate(n: int, send: Any) -> float:
    started = time.perf_counter()
    send()
    return n / (time.perf_counter() - started)


#: The two sides run in alternating rounds, so a change of load on the shared machine during
#: the run weighs on both alike.
ROUNDS = 5


def _interleaved(n: int, ours: Any, theirs: Any) -> tuple[float, float]:
    """Items/s of each side over ROUNDS alternating rounds of n/ROUNDS items each."""
    per_round = n // ROUNDS
    spent = {"ours": 0.0, "theirs": 0.0}
    for round_no in range(ROUNDS):
        offset = round_no * per_round
        for side, send in (("ours", ours), ("theirs", theirs)):
            started = time.perf_counter()
            send(offset, per_round)
            spent[side] += time.perf_counter() - started
    total = per_round * ROUNDS
    return total / spent["ours"], total / spent["theirs"]


def delay_rates(n: int, client: redis.Redis) -> tuple[float, float]:
    """Items/s of ``.delay(item)`` and of plain ``apply_async`` per item, no worker running."""
    client.flushdb()
    sink.delay(_item(-1))  # connect and load the scripts first
    plain_item.apply_async(args=[_item(-1)])

    def ours(offset: int, count: int) -> None:
        for i in range(offset, offset + count):
            sink.delay(_item(i))

    def theirs(offset: int, count: int) -> None:
        for i in range(offset, offset + count):
            plain_item.apply_async(args=[_item(i)])

    rates = _interleaved(n, ours, theirs)
    client.flushdb()
    return rates


def buffered_rates(n: int, client: redis.Redis) -> tuple[float, float]:
    """Items/s of the buffered producer (``.buffered().delay(item)`` per item, timed until its
    ``flush()`` returned, so every item is in Redis) and of plain ``apply_async`` per item."""
    client.flushdb()
    producer = sink.buffered(linger_ms=5)
    producer.delay(_item(-1))
    producer.flush()
    plain_item.apply_async(args=[_item(-1)])

    def ours(offset: int, count: int) -> None:
        delay = producer.delay
        for i in range(offset, offset + count):
            delay(_item(i))
        producer.flush()

    def theirs(offset: int, count: int) -> None:
        for i in range(offset, offset + count):
            plain_item.apply_async(args=[_item(i)])

    rates = _interleaved(n, ours, theirs)
    client.flushdb()
    return rates


def add_many_rates(n: int, client: redis.Redis, chunk: int = 5000) -> tuple[float, float]:
    """Items/s of ``.add_many`` (calls of ``chunk`` items) and of plain Celery publishing one
    task per item over one held producer connection (its cheapest per-item path)."""
    client.flushdb()
    items = [_item(i) for i in range(n)]
    sink.add_many(items[:10])

    def ours(offset: int, count: int) -> None:
        for start in range(offset, offset + count, chunk):
            sink.add_many(items[start : min(offset + count, start + chunk)])

    def theirs(offset: int, count: int) -> None:
        with plain_app.producer_or_acquire() as producer:
            for item in items[offset : offset + count]:
                plain_item.apply_async(args=[item], producer=producer)

    rates = _interleaved(n, ours, theirs)
    client.flushdb()
    return rates


def add_many_buffer_only_rate(n: int, client: redis.Redis, chunk: int = 5000) -> float:
    """Diagnostic: items/s of add_many's own work (encode, one pipelined append per call, the
    claims) without publishing the flush messages, to show where add_many's time goes."""
    client.flushdb()
    state = sink.state()
    opts = state.options
    items = [_item(i) for i in range(n)]

    def append() -> None:
        for start in range(0, n, chunk):
            entries = [state.encode(item) for item in items[start : start + chunk]]
            state.buffer.append_many(
                [("", entries)],
                batch_size=opts.batch_size,
                max_buffered=opts.max_buffered,
                lease_ms=opts.lease_ms,
            )

    rate = _rate(n, append)
    client.flushdb()
    return rate


def end_to_end(side: str, n: int, client: redis.Redis, log_dir: Path, bulk: bool = False) -> float:
    """Items/s from the first send until the worker has processed all ``n`` items."""
    client.flushdb()
    target, queue = (
        ("benchmarks.bench_batching:app", "batch")
        if side == "taskyard"
        else ("benchmarks.bench_batching:plain_app", "celery")
    )
    with celery_worker(target, queue, ENV, log_dir, concurrency=2, name=f"bb-{side}"):
        started = time.perf_counter()
        if side == "celery":
            for i in range(n):
                plain_item.delay(_item(i))
        elif bulk:
            for start in range(0, n, 5000):
                sink.add_many([_item(i) for i in range(start, min(n, start + 5000))])
        else:
            for i in range(n):
                sink.delay(_item(i))
        wait_until(
            lambda: int(client.get(DONE) or 0) >= n, 900, 0.005, f"{side} to process {n} items"
        )
        elapsed = time.perf_counter() - started
    client.flushdb()
    return n / elapsed


def run(quick: bool = False) -> list[Result]:
    n = 5_000 if quick else 50_000
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    rows = []
    delay_ours, delay_celery = delay_rates(n, client)
    rows.append(
        Result(
            "batching.enqueue",
            ".delay(item) rate",
            "items/s",
            delay_ours,
            delay_celery,
            ">= 5x plain apply_async",
            notes=f"N={n}, one process, no worker, {ROUNDS} alternating rounds; plain "
            "Celery: apply_async per item",
        )
    )
    buffered_ours, buffered_celery = buffered_rates(n, client)
    rows.append(
        Result(
            "batching.enqueue",
            "buffered .delay(item) rate, durable at flush",
            "items/s",
            buffered_ours,
            buffered_celery,
            ">= 50,000 items/s and >= 12x plain apply_async",
            notes=f"N={n}, .buffered(linger_ms=5).delay per item, timed until flush() "
            f"returned; {ROUNDS} alternating rounds; plain Celery: apply_async "
            "per item",
        )
    )
    many_ours, many_celery = add_many_rates(n, client)
    rows.append(
        Result(
            "batching.enqueue",
            ".add_many rate",
            "items/s",
            many_ours,
            many_celery,
            ">= 100,000 items/s",
            notes=f"N={n} in calls of 5,000, {ROUNDS} alternating rounds; plain "
            "Celery: apply_async per item over one held producer",
        )
    )
    rows.append(
        Result(
            "batching.enqueue",
            ".add_many rate without flush messages",
            "items/s",
            add_many_buffer_only_rate(n, client),
            None,
            "diagnostic",
            notes="encode + pipelined Lua append + claims; the flush messages "
            f"({n // 100} Celery publishes) left out",
        )
    )
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        log_dir = Path(tmp)
        ours = end_to_end("taskyard", n, client, log_dir)
        ours_bulk = end_to_end("taskyard", n, client, log_dir, bulk=True)
        celery = end_to_end("celery", n, client, log_dir)
    rows.append(
        Result(
            "batching.end_to_end",
            "items processed/s (.delay)",
            "items/s",
            ours,
            celery,
            ">= 10x plain Celery",
            notes=f"N={n}, batch_size 100, .delay per item; one worker -c 2 each; "
            "plain Celery one task per item",
        )
    )
    rows.append(
        Result(
            "batching.end_to_end",
            "items processed/s (.add_many)",
            "items/s",
            ours_bulk,
            celery,
            "",
            notes=f"N={n}, batch_size 100, add_many of 5,000; one worker -c 2",
        )
    )
    return rows
