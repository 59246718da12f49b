"""Alerts: rules from settings, firing and resolving, state in Redis and history."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from taskyard.config import load_settings
from taskyard.monitoring import history
from taskyard.monitoring.alerts import AlertBook, Breach, Timing, evaluate, timing_of, transition
from taskyard.monitoring.collect import collect
from taskyard.monitoring.store import StatsStore
from taskyard.runtime import runtime_of
from taskyard.testing import celery_worker, wait_until
from tests import servers


def _worker(name: str, **readings: Any) -> dict[str, Any]:
    return {"hostname": name, "alive": True, "age_s": 1.0, **readings}


def test_default_rules() -> None:
    settings = load_settings()
    snapshot = {
        "workers": [
            _worker("a@h1", memory_pct=85.0, cpu_pct=10.0),
            _worker("b@h2", memory_pct=95.0, cpu_pct=91.0),
            {"hostname": "c@h3", "alive": False, "age_s": 42.0},
        ],
        "queues": [{"queue": "low", "depth": 1001}, {"queue": "high", "depth": 1000}],
        "slow_statements": [
            {"task": "t.sql", "count": 50, "window_count": 11},
            {"task": "t.ok", "count": 50, "window_count": 10},
        ],
        "cache": [
            {"namespace": "user", "hits": 40, "misses": 60, "hit_rate_pct": 40.0},
            {"namespace": "few", "hits": 1, "misses": 9, "hit_rate_pct": 10.0},
        ],
        "window": {
            "tasks": [
                {"name": "t.slow", "queue": "low", "finished": 10, "slow": 2},
                {"name": "t.fine", "queue": "low", "finished": 10, "slow": 1},
            ]
        },
    }
    got = {(b.alertname, tuple(sorted(b.labels.items()))): b for b in evaluate(snapshot, settings)}
    assert got[("HostMemoryHigh", (("host", "h1"),))].severity == "warning"
    assert got[("HostMemoryHigh", (("host", "h2"),))].severity == "critical"
    assert got[("HostCpuHigh", (("host", "h2"),))].severity == "critical"
    assert ("HostCpuHigh", (("host", "h1"),)) not in got
    assert got[("WorkerHeartbeatMissing", (("worker", "c@h3"),))].severity == "critical"
    assert ("QueueDepthHigh", (("queue", "low"),)) in got
    assert ("QueueDepthHigh", (("queue", "high"),)) not in got  # > 1000, not >=
    assert ("SlowQueries", (("task", "t.sql"),)) in got
    assert ("SlowQueries", (("task", "t.ok"),)) not in got
    assert ("CacheHitRateLow", (("namespace", "user"),)) in got
    assert ("CacheHitRateLow", (("namespace", "few"),)) not in got  # too few lookups to judge
    assert ("SlowTaskRate", (("queue", "low"), ("task", "t.slow"))) in got
    assert ("SlowTaskRate", (("queue", "low"), ("task", "t.fine"))) not in got  # 10 % is not > 10
    assert len(got) == 8


def test_one_host_alert_for_three_workers_naming_the_host_and_reading() -> None:
    settings = load_settings()
    workers = [
        _worker("critical@web1", memory_pct=50.0, cpu_pct=20.0, host_cpu_pct=96.5, host="web1"),
        _worker("default@web1", memory_pct=50.1, cpu_pct=60.0, host_cpu_pct=99.5, host="web1"),
        _worker("batch@web1", memory_pct=50.0, cpu_pct=55.0, host_cpu_pct=98.0, host="web1"),
        _worker("default@web2", memory_pct=40.0, cpu_pct=5.0, host_cpu_pct=20.0, host="web2"),
    ]
    breaches = [
        b for b in evaluate({"workers": workers}, settings) if b.alertname.startswith("Host")
    ]
    assert [(b.alertname, b.labels) for b in breaches] == [("HostCpuHigh", {"host": "web1"})]
    (cpu,) = breaches
    assert cpu.value == 99.5 and cpu.severity == "critical"
    assert cpu.summary == (
        "host web1 CPU at 99.5 % (> 90 %), read by batch@web1, critical@web1, default@web1"
    )
    alerts, changed = transition({}, breaches, 0.0)
    assert list(alerts) == ["HostCpuHigh{host=web1}"] and len(changed) == 1


def test_thresholds_come_from_settings() -> None:
    settings = load_settings(monitoring={"alert_queue_depth": 5})
    breaches = evaluate({"queues": [{"queue": "batch", "depth": 6}]}, settings)
    assert [b.alertname for b in breaches] == ["QueueDepthHigh"]


def test_firing_escalating_resolving_refiring() -> None:
    warn = Breach("HostMemoryHigh", "warning", 85.0, 80.0, "m", {"host": "a"})
    crit = Breach("HostMemoryHigh", "critical", 95.0, 90.0, "m", {"host": "a"})
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


def _timing(for_s: float, resolve_s: float) -> Any:
    return lambda _name: Timing(for_s, resolve_s)


def test_for_duration_and_resolve_delay_on_a_fake_clock() -> None:
    timing = _timing(30.0, 60.0)
    warn = Breach("HostCpuHigh", "warning", 85.0, 80.0, "cpu", {"host": "h"})
    crit = Breach("HostCpuHigh", "critical", 95.0, 90.0, "cpu", {"host": "h"})
    alerts, changed = transition({}, [warn], 0.0, timing)
    assert alerts[warn.id]["state"] == "pending" and alerts[warn.id]["since"] is None
    assert changed == []
    alerts, changed = transition(alerts, [warn], 20.0, timing)
    assert alerts[warn.id]["state"] == "pending" and changed == []
    # Gone before its for duration: dropped, never fired, nothing for the history.
    alerts, changed = transition(alerts, [], 25.0, timing)
    assert alerts == {} and changed == []
    alerts, _ = transition(alerts, [warn], 40.0, timing)
    alerts, changed = transition(alerts, [warn], 69.0, timing)
    assert alerts[warn.id]["state"] == "pending"
    alerts, changed = transition(alerts, [warn], 70.0, timing)
    assert alerts[warn.id]["state"] == "firing" and alerts[warn.id]["since"] == 70.0
    assert alerts[warn.id]["active_since"] == 40.0 and [a["state"] for a in changed] == ["firing"]
    # Escalates at once, steps down only after the higher condition is gone for resolve_s.
    alerts, changed = transition(alerts, [crit], 80.0, timing)
    assert alerts[warn.id]["severity"] == "critical" and len(changed) == 1
    alerts, changed = transition(alerts, [warn], 100.0, timing)
    assert alerts[warn.id]["severity"] == "critical" and changed == []
    alerts, changed = transition(alerts, [warn], 140.0, timing)
    assert alerts[warn.id]["severity"] == "warning" and len(changed) == 1
    # Condition gone: keeps firing through the resolve delay; back within it: same episode.
    alerts, changed = transition(alerts, [], 150.0, timing)
    assert alerts[warn.id]["state"] == "firing" and changed == []
    alerts, changed = transition(alerts, [warn], 190.0, timing)
    assert alerts[warn.id]["since"] == 70.0 and changed == []
    alerts, changed = transition(alerts, [], 249.0, timing)
    assert alerts[warn.id]["state"] == "firing"
    alerts, changed = transition(alerts, [], 250.0, timing)
    assert alerts[warn.id]["state"] == "resolved" and alerts[warn.id]["resolved_at"] == 250.0
    assert [a["state"] for a in changed] == ["resolved"]


def test_a_reading_hovering_at_the_threshold_does_not_flap() -> None:
    """CPU readings over 46 collections 10 s apart, three workers on one host."""
    settings = load_settings()
    hovering = [81.0 if i % 3 else 79.0 for i in range(46)]
    # High for good, with a one-collection dip now and then (a neighbour's short pause).
    dipping = [70.0 if i % 15 == 14 else 95.0 for i in range(46)]

    def run(readings: list[float], timing: Any) -> list[str]:
        alerts: dict[str, dict[str, Any]] = {}
        changes = []
        for i, cpu in enumerate(readings):
            snapshot = {
                "workers": [
                    _worker(f"w{n}@h", memory_pct=10.0, host_cpu_pct=cpu, host="h")
                    for n in range(3)
                ]
            }
            alerts, changed = transition(alerts, evaluate(snapshot, settings), i * 10.0, timing)
            changes += [f"{a['id']}:{a['state']}" for a in changed]
        return changes

    assert len(run(hovering, None)) > 25  # no for/resolve: a change on every crossing
    assert run(hovering, timing_of(settings.monitoring)) == []  # never held for 120 s
    assert len(run(dipping, None)) == 7  # fired 4 times, resolved 3
    assert run(dipping, timing_of(settings.monitoring)) == ["HostCpuHigh{host=h}:firing"]


def test_collection_fires_and_resolves(
    make_app: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    app = make_app(
        "alerts",
        database_url=f"sqlite:///{tmp_path / 'history.db'}",
        monitoring={"alert_for_s": 0.0, "alert_resolve_s": 0.0, "alert_timing": {}},
    )
    runtime = runtime_of(app)
    keys = runtime.keys
    store = StatsStore(runtime)
    now = time.time()

    def heartbeat(host: str, memory_pct: float) -> None:
        beat = {
            "hostname": host,
            "pid": 1,
            "at": time.time(),
            "queues": ["low"],
            "paused_queues": [],
            "memory_pct": memory_pct,
            "cpu_pct": 5.0,
            "memory_source": "host",
            "memory_available_mb": 100.0,
            "state": "ok",
            "deferred": 0,
            "overdue": 0,
        }
        redis_client.set(keys.worker_heartbeat(host), json.dumps(beat), ex=10)
        redis_client.zadd(keys.workers(), {host: beat["at"]})

    heartbeat("w1@x", 95.0)
    redis_client.zadd(keys.workers(), {"gone@x": now - 60})  # its heartbeat key expired
    redis_client.lpush("batch", *[b"{}"] * 600)
    redis_client.lpush("batch\x06\x169", *[b"{}"] * 401)  # 1001 in all, only counting sub-lists
    collect(runtime)
    firing = {(a["alertname"], a["severity"]) for a in store.alerts()}
    assert firing == {
        ("HostMemoryHigh", "critical"),
        ("WorkerHeartbeatMissing", "critical"),
        ("QueueDepthHigh", "warning"),
    }
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
    changes = AlertBook(redis_client, keys).history()
    assert [c["state"] for c in changes] == ["resolved"] * 3 + ["firing"] * 3
    # The alert series keeps what fired when.
    series = store.series("alerts", None, None, 10, 0)
    assert [s["firing"] for s in series] == [0, 3]
    history._engines.clear()


def test_for_and_resolve_timing_on_a_real_collection_loop(
    make_app: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    app = make_app(
        "alertloop",
        database_url=f"sqlite:///{tmp_path / 'loop.db'}",
        monitoring={
            "alert_for_s": 1.0,
            "alert_resolve_s": 1.5,
            "alert_timing": {},
            "alert_history_length": 10,
        },
    )
    runtime = runtime_of(app)
    keys = runtime.keys
    store = StatsStore(runtime)
    book = AlertBook(redis_client, keys)
    memory = {"pct": 95.0}
    stop = threading.Event()

    def heartbeats() -> None:
        while not stop.is_set():
            for name in ("a@loophost", "b@loophost", "c@loophost"):
                beat = {
                    "hostname": name,
                    "host": "loophost",
                    "pid": 1,
                    "at": time.time(),
                    "memory_pct": memory["pct"],
                    "cpu_pct": 5.0,
                    "host_cpu_pct": 10.0,
                }
                redis_client.set(keys.worker_heartbeat(name), json.dumps(beat), ex=5)
                redis_client.zadd(keys.workers(), {name: beat["at"]})
            stop.wait(0.1)

    def loop() -> None:
        while not stop.is_set():
            collect(runtime)
            stop.wait(0.2)

    threads = [threading.Thread(target=heartbeats), threading.Thread(target=loop)]
    started = time.time()
    for t in threads:
        t.start()
    try:

        def host_alert() -> dict[str, Any] | None:
            rows = [
                a for a in store.alerts(include_resolved=True) if a["alertname"] == "HostMemoryHigh"
            ]
            assert len(rows) <= 1, rows  # one alert for the three workers of the host
            return rows[0] if rows else None

        wait_until(lambda: (host_alert() or {}).get("state") == "firing", 10, 0.05, "firing")
        fired = host_alert()
        assert fired is not None and fired["since"] - started >= 1.0
        assert fired["since"] - fired["active_since"] >= 1.0
        assert "host loophost memory at 95.0 %" in fired["summary"]
        memory["pct"] = 40.0
        cleared = time.time()
        wait_until(lambda: (host_alert() or {}).get("state") == "resolved", 10, 0.05, "resolved")
        resolved = host_alert()
        assert resolved is not None and resolved["resolved_at"] - cleared >= 1.5 - 0.25
        assert resolved["since"] == fired["since"]
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    changes = [c for c in book.history() if c["alertname"] == "HostMemoryHigh"]
    assert [c["state"] for c in changes] == ["resolved", "firing"]
    episodes = [e for e in store.alert_history() if e["alertname"] == "HostMemoryHigh"]
    assert len(episodes) == 1 and episodes[0]["state"] == "resolved"
    history._engines.clear()


def test_history_list_is_capped(redis_client: redis.Redis, make_app: Any) -> None:
    runtime = runtime_of(make_app("alertcap"))
    book = AlertBook(redis_client, runtime.keys)
    alerts: dict[str, dict[str, Any]] = {}
    breaches: list[Breach] = []
    for i in range(12):
        breaches.append(
            Breach("QueueDepthHigh", "warning", 2000.0, 1000.0, "q", {"queue": f"q{i}"})
        )
        alerts, changed = transition(alerts, breaches, float(i))
        book.save(alerts, float(i), 3600.0, changed, history_length=10)
    assert len(book.history(100)) == 10
    assert book.history(1)[0]["labels"] == {"queue": "q11"}


@pytest.mark.slow
def test_heartbeat_missing_fires_when_a_worker_dies(
    make_app: Any, redis_env: dict[str, str], tmp_path: Path
) -> None:
    app = make_app("monitor", database_url=f"sqlite:///{tmp_path / 'h.db'}")
    runtime = runtime_of(app)
    store = StatsStore(runtime)
    env = {
        **redis_env,
        "TASKYARD_GUARD__ENABLED": "false",
        "TASKYARD_GUARD__HEARTBEAT_INTERVAL_S": "0.3",
        "TASKYARD_GUARD__HEARTBEAT_SLACK_S": "0.5",
    }

    def mine() -> list[dict[str, Any]]:
        return [w for w in store.workers() if w["hostname"].startswith("hb@")]

    def hb_alerts() -> list[dict[str, Any]]:
        return [
            a
            for a in store.alerts(include_resolved=True)
            if a["alertname"] == "WorkerHeartbeatMissing"
            and a["labels"]["worker"].startswith("hb@")
        ]

    with celery_worker(
        "tests.apps.monitor", "high", env, tmp_path, concurrency=1, name="hb"
    ) as worker:
        wait_until(lambda: bool(mine()) and mine()[0]["alive"], 20, 0.1, "a heartbeat")
        host = mine()[0]["hostname"]
        collect(runtime)
        assert hb_alerts() == []
        worker.kill()  # SIGKILL: no clean removal of its record
    wait_until(lambda: not mine()[0]["alive"], 20, 0.1, "the heartbeat to expire")
    collect(runtime)
    (alert,) = hb_alerts()
    assert (alert["state"], alert["severity"], alert["labels"]) == (
        "firing",
        "critical",
        {"worker": host},
    )
    with celery_worker("tests.apps.monitor", "high", env, tmp_path, concurrency=1, name="hb"):
        wait_until(lambda: mine()[0]["alive"], 20, 0.1, "the worker to come back")
        collect(runtime)
    (alert,) = hb_alerts()
    assert alert["state"] == "resolved" and alert["resolved_at"] >= alert["since"]


def test_host_readings_deferrals_and_alert_history_in_the_api_metrics_and_dashboard(
    tmp_path: Path, redis_client: redis.Redis, make_app: Any
) -> None:
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from taskyard.keys import Keys
    from taskyard.monitoring.api.app import create_api

    settings = load_settings(
        redis_url=servers.REDIS_URL,
        database_url=f"sqlite:///{tmp_path / 'h.db'}",
        monitoring={"api_cache_s": 0.0, "alert_timing": {}},
    )
    keys = Keys(settings.namespace)
    for name, cpu, deferred in (
        ("a@web1", 97.0, {"memory": 4, "requires_memory": 1}),
        ("b@web1", 99.0, {"memory": 2, "requires_memory": 0}),
        ("c@web1", 98.0, {"memory": 0, "requires_memory": 0}),
    ):
        beat = {
            "hostname": name,
            "host": "web1",
            "pid": 1,
            "at": time.time(),
            "memory_pct": 50.0,
            "cpu_pct": 30.0,
            "host_cpu_pct": cpu,
            "deferred": sum(deferred.values()),
            "deferred_by_reason": deferred,
            "paused_queues": ["low"],
            "paused_reasons": {"low": "cpu"},
        }
        redis_client.set(keys.worker_heartbeat(name), json.dumps(beat), ex=30)
        redis_client.zadd(keys.workers(), {name: beat["at"]})
    runtime = runtime_of(
        make_app("alertapi", database_url=settings.database_url, monitoring={"alert_timing": {}})
    )
    collect(runtime)
    with TestClient(create_api(settings)) as client:
        overview = client.get("/api/v1/overview").json()
        assert overview["deferred_by_reason"] == {"memory": 6, "requires_memory": 1}
        workers = {w["hostname"]: w for w in client.get("/api/v1/workers").json()}
        assert workers["a@web1"]["deferred_by_reason"] == {"memory": 4, "requires_memory": 1}
        assert workers["b@web1"]["paused_reasons"] == {"low": "cpu"}
        (change,) = client.get("/api/v1/alerts/history").json()
        assert change["alertname"] == "HostCpuHigh" and change["state"] == "firing"
        assert change["summary"].startswith("host web1 CPU at 99.0 %")
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        host_cpu = [(s.labels, s.value) for s in families["taskyard_host_cpu_percent"].samples]
        assert host_cpu == [({"host": "web1"}, 99.0)]
        deferred_total = {
            (s.labels["hostname"], s.labels["reason"]): s.value
            for s in families["taskyard_worker_deferred"].samples
            if s.name.endswith("_total")
        }
        assert deferred_total[("a@web1", "requires_memory")] == 1 and len(deferred_total) == 6
        paused = families["taskyard_worker_paused_queue"].samples
        assert {
            (s.labels["hostname"], s.labels["queue_name"], s.labels["reason"]) for s in paused
        } == {(n, "low", "cpu") for n in ("a@web1", "b@web1", "c@web1")}
        page = client.get("/dashboard").text
        assert 'id="alert-history"' in page and "HostCpuHigh" in page


def test_redis_evicting_and_memory_high() -> None:
    from taskyard.monitoring.alerts import evaluate

    settings = load_settings()
    row = {"redis": "broker", "policy": "allkeys-lru", "used_memory": 95, "maxmemory": 100}
    found = {
        b.alertname: b for b in evaluate({"redis": [{**row, "evicted_recently": 12}]}, settings)
    }
    assert found["RedisEvicting"].severity == "critical" and found["RedisEvicting"].value == 12
    assert "maxmemory-policy allkeys-lru" in found["RedisEvicting"].summary
    assert found["RedisMemoryHigh"].labels == {"redis": "broker"}
    calm = {**row, "evicted_recently": 0, "used_memory": 50}
    assert (
        evaluate({"redis": [calm, {**calm, "maxmemory": 0, "used_memory": 10**9}]}, settings) == []
    )
