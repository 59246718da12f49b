"""Alerts: rules from settings, firing and resolving, state in Redis and history."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from taskyard.config import load_settings
from taskyard.monitoring import history
from taskyard.monitoring.alerts import Breach, evaluate, transition
from taskyard.monitoring.collect import collect
from taskyard.monitoring.store import StatsStore
from taskyard.runtime import runtime_of
from taskyard.testing import celery_worker, wait_until


def _worker(host: str, **readings: Any) -> dict[str, Any]:
    return {"hostname": host, "alive": True, "age_s": 1.0, **readings}


def test_default_rules() -> None:
    settings = load_settings()
    snapshot = {
        "workers": [_worker("a", memory_pct=85.0, cpu_pct=10.0),
                    _worker("b", memory_pct=95.0, cpu_pct=91.0),
                    {"hostname": "c", "alive": False, "age_s": 42.0}],
        "queues": [{"queue": "low", "depth": 1001}, {"queue": "high", "depth": 1000}],
        "slow_statements": [{"task": "t.sql", "count": 50, "window_count": 11},
                            {"task": "t.ok", "count": 50, "window_count": 10}],
        "cache": [{"namespace": "user", "hits": 40, "misses": 60, "hit_rate_pct": 40.0},
                  {"namespace": "few", "hits": 1, "misses": 9, "hit_rate_pct": 10.0}],
        "window": {"tasks": [{"name": "t.slow", "queue": "low", "finished": 10, "slow": 2},
                             {"name": "t.fine", "queue": "low", "finished": 10, "slow": 1}]},
    }
    got = {(b.alertname, tuple(sorted(b.labels.items()))): b for b in evaluate(snapshot, settings)}
    assert got[("WorkerMemoryHigh", (("worker", "a"),))].severity == "warning"
    assert got[("WorkerMemoryHigh", (("worker", "b"),))].severity == "critical"
    assert got[("WorkerCpuHigh", (("worker", "b"),))].severity == "critical"
    assert ("WorkerCpuHigh", (("worker", "a"),)) not in got
    assert got[("WorkerHeartbeatMissing", (("worker", "c"),))].severity == "critical"
    assert ("QueueDepthHigh", (("queue", "low"),)) in got
    assert ("QueueDepthHigh", (("queue", "high"),)) not in got  # > 1000, not >=
    assert ("SlowQueries", (("task", "t.sql"),)) in got
    assert ("SlowQueries", (("task", "t.ok"),)) not in got
    assert ("CacheHitRateLow", (("namespace", "user"),)) in got
    assert ("CacheHitRateLow", (("namespace", "few"),)) not in got  # too few lookups to judge
    assert ("SlowTaskRate", (("queue", "low"), ("task", "t.slow"))) in got
    assert ("SlowTaskRate", (("queue", "low"), ("task", "t.fine"))) not in got  # 10 % is not > 10
    assert len(got) == 8


def test_thresholds_come_from_settings() -> None:
    settings = load_settings(monitoring={"alert_queue_depth": 5})
    breaches = evaluate({"queues": [{"queue": "batch", "depth": 6}]}, settings)
    assert [b.alertname for b in breaches] == ["QueueDepthHigh"]


def test_firing_escalating_resolving_refiring() -> None:
    warn = Breach("WorkerMemoryHigh", "warning", 85.0, 80.0, "m", {"worker": "a"})
    crit = Breach("WorkerMemoryHigh", "critical", 95.0, 90.0, "m", {"worker": "a"})
    alerts, changed = transition({}, [warn], now=100.0)
    (alert,) = alerts.values()
    assert (alert["state"], alert["since"], alert["resolved_at"]) == ("firing", 100.0, None)
    assert len(changed) == 1
    alerts, changed = transition(alerts, [warn], now=110.0)
    assert changed == [] and alerts[warn.id]["since"] == 100.0
    alerts, changed = transition(alerts, [crit], now=120.0)
    assert alerts[warn.id]["severity"] == "critical" and alerts[warn.id]["since"] == 100.0
    assert len(changed) == 1
    alerts, changed = transition(alerts, [], now=130.0)
    assert alerts[warn.id]["state"] == "resolved" and alerts[warn.id]["resolved_at"] == 130.0
    alerts, changed = transition(alerts, [], now=140.0)
    assert changed == [] and alerts[warn.id]["resolved_at"] == 130.0
    alerts, changed = transition(alerts, [warn], now=150.0)
    assert alerts[warn.id]["since"] == 150.0 and alerts[warn.id]["resolved_at"] is None


def test_collection_fires_and_resolves(make_app: Any, redis_client: redis.Redis,
                                       tmp_path: Path) -> None:
    app = make_app("alerts", database_url=f"sqlite:///{tmp_path / 'history.db'}")
    runtime = runtime_of(app)
    keys = runtime.keys
    store = StatsStore(runtime)
    now = time.time()

    def heartbeat(host: str, memory_pct: float) -> None:
        beat = {"hostname": host, "pid": 1, "at": time.time(), "queues": ["low"],
                "paused_queues": [], "memory_pct": memory_pct, "cpu_pct": 5.0,
                "memory_source": "host", "memory_available_mb": 100.0, "state": "ok",
                "deferred": 0, "overdue": 0}
        redis_client.set(keys.worker_heartbeat(host), json.dumps(beat), ex=10)
        redis_client.zadd(keys.workers(), {host: beat["at"]})

    heartbeat("w1@x", 95.0)
    redis_client.zadd(keys.workers(), {"gone@x": now - 60})  # its heartbeat key expired
    redis_client.lpush("batch", *[b"{}"] * 600)
    redis_client.lpush("batch\x06\x169", *[b"{}"] * 401)  # 1001 in all, only counting sub-lists
    collect(runtime)
    firing = {(a["alertname"], a["severity"]) for a in store.alerts()}
    assert firing == {("WorkerMemoryHigh", "critical"), ("WorkerHeartbeatMissing", "critical"),
                      ("QueueDepthHigh", "warning")}
    since = {a["id"]: a["since"] for a in store.alerts()}

    heartbeat("w1@x", 40.0)
    heartbeat("gone@x", 40.0)  # back
    redis_client.delete("batch\x06\x169")
    collect(runtime)
    assert store.alerts() == []
    resolved = store.alerts(include_resolved=True)
    assert {a["state"] for a in resolved} == {"resolved"}
    assert all(a["resolved_at"] >= a["since"] == since[a["id"]] for a in resolved)

    episodes = store.alert_history()
    assert len(episodes) == 3 and all(e["state"] == "resolved" for e in episodes)
    # The alert series keeps what fired when.
    series = store.series("alerts", None, None, 10, 0)
    assert [s["firing"] for s in series] == [0, 3]
    history._engines.clear()


@pytest.mark.slow
def test_heartbeat_missing_fires_when_a_worker_dies(make_app: Any, redis_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    app = make_app("monitor", database_url=f"sqlite:///{tmp_path / 'h.db'}")
    runtime = runtime_of(app)
    store = StatsStore(runtime)
    env = {**redis_env, "TASKYARD_GUARD__ENABLED": "false",
           "TASKYARD_GUARD__HEARTBEAT_INTERVAL_S": "0.3",
           "TASKYARD_GUARD__HEARTBEAT_SLACK_S": "0.5"}

    def mine() -> list[dict[str, Any]]:
        return [w for w in store.workers() if w["hostname"].startswith("hb@")]

    def hb_alerts() -> list[dict[str, Any]]:
        return [a for a in store.alerts(include_resolved=True)
                if a["alertname"] == "WorkerHeartbeatMissing"
                and a["labels"]["worker"].startswith("hb@")]

    with celery_worker("tests.apps.monitor", "high", env, tmp_path, concurrency=1,
                       name="hb") as worker:
        wait_until(lambda: bool(mine()) and mine()[0]["alive"], 20, 0.1, "a heartbeat")
        host = mine()[0]["hostname"]
        collect(runtime)
        assert hb_alerts() == []
        worker.kill()  # SIGKILL: no clean removal of its record
    wait_until(lambda: not mine()[0]["alive"], 20, 0.1, "the heartbeat to expire")
    collect(runtime)
    (alert,) = hb_alerts()
    assert (alert["state"], alert["severity"], alert["labels"]) == (
        "firing", "critical", {"worker": host})
    with celery_worker("tests.apps.monitor", "high", env, tmp_path, concurrency=1, name="hb"):
        wait_until(lambda: mine()[0]["alive"], 20, 0.1, "the worker to come back")
        collect(runtime)
    (alert,) = hb_alerts()
    assert alert["state"] == "resolved" and alert["resolved_at"] >= alert["since"]
