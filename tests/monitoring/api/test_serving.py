"""The response cache (single flight, time to live) and `taskyard api` as a real uvicorn process."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from taskyard.devstack.supervisor import free_port
from taskyard.monitoring.api.query import ResponseCache, parse_time
from tests import servers


def test_cache_single_flight_one_computation_for_concurrent_requests() -> None:
    calls = 0
    gate = threading.Event()

    def compute() -> int:
        nonlocal calls
        calls += 1
        gate.wait(5)
        return calls

    async def scenario() -> list[int]:
        cache = ResponseCache(ttl_s=10.0)
        waiters = [asyncio.create_task(cache.get("k", compute)) for _ in range(20)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*waiters)

    assert asyncio.run(scenario()) == [1] * 20
    assert calls == 1


def test_cache_expires_revalidates_and_does_not_keep_errors() -> None:
    now = [100.0]
    cache = ResponseCache(ttl_s=1.0, clock=lambda: now[0], stale_factor=3.0)
    values: Iterator[int | Exception] = iter([ValueError("down"), 1, 2, 3])

    def compute() -> int:
        value = next(values)
        if isinstance(value, Exception):
            raise value
        return value

    async def scenario() -> list[int]:
        with pytest.raises(ValueError):
            await cache.get("k", compute)  # errors are not cached...
        seen = [await cache.get("k", compute)]  # ...the next request computes again
        now[0] += 0.5
        seen.append(await cache.get("k", compute))  # fresh: cached
        now[0] += 1.0
        seen.append(await cache.get("k", compute))  # expired: stale now, refresh behind
        while cache._inflight or cache._background:
            await asyncio.sleep(0.01)
        seen.append(await cache.get("k", compute))  # the refreshed value
        now[0] += 10.0
        seen.append(await cache.get("k", compute))  # too old to serve: waits for a new one
        return seen

    assert asyncio.run(scenario()) == [1, 1, 1, 2, 3]


def test_cache_refreshes_once_when_many_requests_find_it_expired() -> None:
    now = [0.0]
    calls = 0

    def compute() -> int:
        nonlocal calls
        calls += 1
        time.sleep(0.02)
        return calls

    async def scenario() -> list[int]:
        cache = ResponseCache(ttl_s=1.0, clock=lambda: now[0])
        await cache.get("k", compute)
        now[0] += 1.5
        served = await asyncio.gather(*(cache.get("k", compute) for _ in range(50)))
        while cache._background:
            await asyncio.sleep(0.01)
        return [*served, await cache.get("k", compute)]

    served = asyncio.run(scenario())
    assert served == [1] * 50 + [2]  # stale answers while one refresh ran
    assert calls == 2


def test_cache_is_bounded() -> None:
    cache = ResponseCache(ttl_s=60.0, max_entries=8)

    async def scenario() -> None:
        for i in range(50):
            await cache.get(i, functools.partial(int, i))

    asyncio.run(scenario())
    assert len(cache._entries) <= 8


def test_parse_time_accepts_epoch_and_iso() -> None:
    assert parse_time("since", "1767225600") == 1767225600.0
    assert parse_time("since", "2026-01-01T00:00:00Z") == 1767225600.0
    assert parse_time("since", "2026-01-01T01:00:00+01:00") == 1767225600.0
    assert parse_time("since", "2026-01-01") == 1767225600.0
    assert parse_time("since", None) is None


@pytest.mark.slow
def test_taskyard_api_serves_over_real_uvicorn(tmp_path: Path, redis_client: redis.Redis) -> None:
    port = free_port()
    env = {
        **os.environ,
        "TASKYARD_REDIS_URL": servers.REDIS_URL,
        "TASKYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'history.db'}",
        "TASKYARD_MONITORING__API_PORT": str(port),
        "TASKYARD_MONITORING__API_TOKEN": "tok",
    }
    log = (tmp_path / "api.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "taskyard.cli", "api", "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (tmp_path / "api.log").read_text()
            assert time.monotonic() < deadline, "taskyard api did not start within 30 s"
            time.sleep(0.1)
        redis_client.lpush("high", b"{}")
        with httpx.Client(base_url=base, timeout=5) as client:
            assert client.get("/health/ready").json()["status"] == "ready"
            overview = client.get("/api/v1/overview").json()
            assert overview["queues"]["high"] == 1
            metrics = client.get("/metrics", headers={"Accept-Encoding": "gzip"})
            assert metrics.headers["content-encoding"] == "gzip"
            assert 'celery_queue_length{queue_name="high"} 1.0' in metrics.text
            assert client.post("/api/v1/admin/maintenance/run").status_code == 401
            assert client.get("/openapi.json").json()["info"]["title"] == "taskyard stats API"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        log.close()
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    output = (tmp_path / "api.log").read_text()
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output


class SlowCountingStore:
    """The real store, with each overview read held (blocking, like a slow Redis) until the
    test opens the gate, at most ``hold_s``; reads begun and finished are counted."""

    def __init__(self, store: Any, hold_s: float = 30.0) -> None:
        self._store = store
        self.hold_s = hold_s
        self.gate = threading.Event()
        self.overview_reads = 0
        self.finished_reads = 0

    def overview(self) -> dict[str, Any]:
        self.overview_reads += 1
        self.gate.wait(self.hold_s)
        self.finished_reads += 1
        return self._store.overview()  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_slow_store_reads_do_not_block_the_event_loop_and_are_shared(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    from taskyard.monitoring.api.app import _resolve, create_api
    from taskyard.monitoring.store import StatsStore
    from tests.monitoring.api.test_api import api_settings

    settings = api_settings(tmp_path, api_cache_s=5.0)
    runtime, _ = _resolve(settings)
    store = SlowCountingStore(StatsStore(runtime))
    api = create_api(runtime, store=store)  # type: ignore[arg-type]

    async def scenario() -> tuple[int, list[int]]:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            burst = [asyncio.create_task(client.get("/api/v1/overview")) for _ in range(20)]
            while store.overview_reads == 0:  # bounded by the test's timeout
                await asyncio.sleep(0.01)
            live = await client.get("/health/live")
            assert live.status_code == 200
            # Answered while the store read was still held: a read blocking the event loop
            # would have held /health/live until the gate (up to 30 s) let it finish.
            finished_when_live = store.finished_reads
            store.gate.set()
            return finished_when_live, [r.status_code for r in await asyncio.gather(*burst)]

    finished_when_live, statuses = asyncio.run(scenario())
    assert finished_when_live == 0, "/health/live waited behind a blocking store read"
    assert statuses == [200] * 20
    assert store.overview_reads == 1  # twenty concurrent requests, one store read
