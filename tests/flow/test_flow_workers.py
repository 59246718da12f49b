"""Flow control with real worker processes on real Redis: limits, fair share, pauses."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis

from taskyard.testing import celery_worker, run_python

pytestmark = pytest.mark.slow

STARTS = "test:starts"
LEASE_S, SWEEP_S = 3.0, 1


def _env(redis_env: dict[str, str], lease_s: float = LEASE_S) -> dict[str, str]:
    return {
        **redis_env,
        "TASKYARD_GUARD__ENABLED": "false",
        "TASKYARD_RESERVATION_LEASE_S": str(lease_s),
        "TASKYARD_UNACKED_RESTORE_INTERVAL_S": str(SWEEP_S),
    }


def _send(env: dict[str, str], code: str) -> None:
    run_python(env, f"from tests.apps import flow\n{code}")


def _starts(client: redis.Redis) -> list[tuple[str, str, float]]:
    out = []
    for raw in client.lrange(STARTS, 0, -1):
        task, key, at = raw.decode().split("|")
        out.append((task, key, float(at)))
    return out


def _store(env: dict[str, str]):  # type: ignore[no-untyped-def]
    """The flow store of the test app, in this process."""
    import os

    from taskyard import flow

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from tests.apps import flow as flow_app

        return flow.store_of(flow_app.app)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_concurrency_holds_across_three_workers(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env)
    total = 24
    _send(env, f"for i in range({total}):\n    flow.capped.delay(f'c{{i}}', 0.25)")
    _send(env, "for i in range(20):\n    flow.plain.delay(f'p{i}')")
    peak_seen = 0
    with ExitStack() as stack:
        for n in range(3):
            stack.enter_context(
                celery_worker(
                    "tests.apps.flow", "normal", env, tmp_path, concurrency=2, name=f"w{n}"
                )
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            # Sampled continuously: the running counter the tasks keep.
            peak_seen = max(peak_seen, int(redis_client.get("test:running:capped") or 0))
            starts = _starts(redis_client)
            if sum(1 for s in starts if s[0] == "capped") == total:
                break
            time.sleep(0.01)
    starts = _starts(redis_client)
    assert sum(1 for s in starts if s[0] == "capped") == total
    assert sum(1 for s in starts if s[0] == "plain") == 20
    assert int(redis_client.get("test:peak:capped") or 0) == 2
    assert peak_seen <= 2
