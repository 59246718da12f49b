"""Resource guards without worker processes: policy, hysteresis, cgroup parsing, sampler,
deferral (real Redis broker), accounting merge and heartbeat (real Redis)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import Ignore

from taskyard.config import GuardSettings, load_settings
from taskyard.errors import ConfigurationError
from taskyard.workers.guards import (
    HEADER_DEFERRALS,
    HEADER_SINCE,
    Band,
    Counters,
    MemoryReadings,
    Policy,
    Pressure,
    Probe,
    Reading,
    Sampler,
    Valve,
    guard_of,
)
from taskyard.workers.guards.accounting import TaskMeter
from taskyard.workers.guards.cgroup import (
    CgroupV2,
    find_v2_mount,
    parse_cpu_max,
    parse_flat_keyed,
    parse_memory_max,
    parse_proc_cgroup,
)
from taskyard.workers.guards.defer import DEFERRED, OVERDUE
from taskyard.workers.guards.readings import Measurement

DATA = Path(__file__).resolve().parents[2] / "data" / "cgroup"


def reading(memory: float = 10.0, cpu: float = 5.0, available_mb: float = 8000.0) -> Reading:
    return Reading(memory, available_mb, 10000.0, "host", cpu, time.time())


# --- policy -------------------------------------------------------------------------------


@pytest.fixture
def policy() -> Policy:
    return Policy(GuardSettings())


def test_quiet_machine_admits_every_level(policy: Policy) -> None:
    for level in ("critical", "high", "normal", "low", "batch"):
        assert policy.check(level, reading(50, 50)) is None
    assert policy.pressure(reading(50, 50)) is Pressure.OK


@pytest.mark.parametrize("level", ["normal", "low", "batch"])
def test_warning_holds_normal_low_batch_by_memory_never_by_cpu(policy: Policy, level: str) -> None:
    assert policy.check(level, reading(memory=80.0)) is None  # at the threshold: not above it
    held = policy.hold(level, reading(memory=80.5))
    assert held is not None and held.kind == "memory"
    assert held.text == "memory 80.5% above 80%"
    # CPU pressure is handled at the source (paused consumers, nice), never by deferral.
    assert policy.check(level, reading(cpu=100.0)) is None


def test_high_waits_only_at_memory_critical(policy: Policy) -> None:
    assert policy.check("high", reading(memory=89.0)) is None
    assert policy.check("high", reading(cpu=99.0)) is None  # CPU never holds high work
    assert policy.check("high", reading(memory=90.5)) is not None


def test_critical_always_runs_even_when_short_of_memory(policy: Policy) -> None:
    assert (
        policy.check(
            "critical", reading(memory=99.9, cpu=100.0, available_mb=1.0), requires_memory_mb=4096
        )
        is None
    )


def test_requires_memory_waits_until_available(policy: Policy) -> None:
    held = policy.hold("low", reading(available_mb=300.0), requires_memory_mb=512)
    assert held == ("requires_memory", "needs 512 MB, 300 MB available")
    assert policy.check("low", reading(available_mb=600.0), requires_memory_mb=512) is None
    assert policy.check("high", reading(available_mb=100.0), requires_memory_mb=512) is not None


def test_pressure_levels(policy: Policy) -> None:
    assert policy.pressure(reading(memory=85)) is Pressure.WARNING
    assert policy.pressure(reading(cpu=95)) is Pressure.CRITICAL
    assert policy.pressure(reading(memory=91, cpu=10)).label == "critical"


def test_level_policy_is_overridable() -> None:
    settings = GuardSettings(
        level_policy={
            "critical": "never",
            "high": "warning",
            "normal": "critical",
            "low": "memory_warning",
            "batch": "never",
        }
    )
    policy = Policy(settings)
    assert policy.check("high", reading(memory=85)) is not None
    assert policy.check("high", reading(cpu=99)) is None
    assert policy.check("normal", reading(memory=85)) is None
    assert policy.check("normal", reading(memory=91)) is not None
    assert policy.check("low", reading(cpu=99)) is None
    assert policy.check("low", reading(memory=81)) is not None
    assert policy.check("batch", reading(memory=99)) is None


def test_unlisted_and_foreign_levels_follow_the_default_level() -> None:
    policy = Policy(GuardSettings(level_policy={"critical": "never"}), default_level="normal")
    assert policy.check("celery", reading(memory=85)) is not None
    assert policy.check("low", reading(memory=85)) is not None
    assert policy.check("critical", reading(memory=99)) is None


def test_bad_level_policy_names_the_value() -> None:
    with pytest.raises(ConfigurationError, match="unknown level 'urgent'"):
        Policy(GuardSettings(level_policy={"urgent": "never"}))


def test_settings_reject_inverted_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKYARD_GUARD__RESUME_PCT", "85")
    with pytest.raises(ConfigurationError, match="resume_pct must be below"):
        load_settings()
    monkeypatch.setenv("TASKYARD_GUARD__RESUME_PCT", "70")
    monkeypatch.setenv("TASKYARD_GUARD__MEMORY_WARNING_PCT", "95")
    with pytest.raises(ConfigurationError, match="memory_warning_pct must not exceed"):
        load_settings()


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKYARD_GUARD__MEMORY_WARNING_PCT", "60")
    monkeypatch.setenv("TASKYARD_GUARD__RESUME_PCT", "50")
    monkeypatch.setenv("TASKYARD_GUARD__LEVEL_POLICY", '{"critical": "never", "high": "never"}')
    guard = load_settings().guard
    assert guard.memory_warning_pct == 60 and guard.resume_pct == 50
    assert Policy(guard).check("high", reading(memory=99)) is None


# --- hysteresis and the valve -------------------------------------------------------------


def test_band_pauses_above_and_resumes_only_below_the_lower_threshold() -> None:
    band = Band(80, 70)
    assert band.update(79) is False
    assert band.update(81) is True
    # Between resume and warning: stays on (no flapping around one value).
    for value in (79, 75, 71, 70):
        assert band.update(value) is True
    assert band.update(69.9) is False
    assert band.update(75) is False  # below warning: stays off
    with pytest.raises(ValueError, match="resume threshold 90 must not exceed"):
        Band(80, 90)


class FakeConsumer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def cancel_task_queue(self, queue: str) -> None:
        self.calls.append(("cancel", queue))

    def add_task_queue(self, queue: str) -> None:
        self.calls.append(("add", queue))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def valve_of(queues: list[str], clock: Clock | None = None, **settings: Any) -> Valve:
    valve = Valve(GuardSettings(**settings), clock or Clock())
    valve.bind(queues)
    return valve


def test_valve_pauses_only_pausable_queues_and_never_critical(
    caplog: pytest.LogCaptureFixture,
) -> None:
    valve = valve_of(
        ["critical", "high", "low", "batch"], pausable_levels=["low", "batch", "critical"]
    )
    consumer = FakeConsumer()
    with caplog.at_level("WARNING", logger="taskyard.guards"):
        valve.tick(consumer, reading(memory=85))
        valve.tick(consumer, reading(memory=75))
        valve.tick(consumer, reading(memory=60))
    assert consumer.calls == [
        ("cancel", "low"),
        ("cancel", "batch"),
        ("add", "low"),
        ("add", "batch"),
    ]
    assert valve.paused == [] and valve.transitions == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("paused queues low,batch (memory 85.0%" in m for m in messages)
    assert any("resumed queues low,batch (memory 60.0%" in m for m in messages)


def test_valve_skips_queues_the_worker_does_not_consume() -> None:
    valve = valve_of(["critical", "high"])
    consumer = FakeConsumer()
    valve.tick(consumer, reading(memory=95, cpu=100))
    assert consumer.calls == [] and valve.paused == []


def test_cpu_warning_pauses_low_and_batch_critical_adds_normal_never_high() -> None:
    clock = Clock()
    valve = valve_of(
        ["critical", "high", "normal", "low", "batch"],
        clock,
        cpu_pause_levels=["low", "batch", "high"],
        cpu_critical_pause_levels=["normal", "critical"],
    )
    consumer = FakeConsumer()
    valve.tick(consumer, reading(cpu=85))
    assert valve.reasons == {"low": "cpu", "batch": "cpu"}
    clock.now += 1
    valve.tick(consumer, reading(cpu=95))
    assert valve.reasons == {"normal": "cpu-critical", "low": "cpu", "batch": "cpu"}
    clock.now += 0.5
    valve.tick(consumer, reading(cpu=87))  # above critical's resume (85): normal stays held
    assert "normal" in valve.reasons
    clock.now += 0.5
    valve.tick(consumer, reading(cpu=84))
    assert valve.reasons == {"low": "cpu", "batch": "cpu"}
    clock.now += 0.5
    valve.tick(consumer, reading(cpu=72))  # between 70 and 80: still held
    assert valve.paused == ["low", "batch"]
    valve.tick(consumer, reading(cpu=69))
    assert valve.paused == []
    assert ("cancel", "critical") not in consumer.calls
    assert ("cancel", "high") not in consumer.calls


def test_cpu_hold_is_released_periodically_so_held_levels_never_starve() -> None:
    clock = Clock()
    valve = valve_of(["normal", "low"], clock, cpu_max_hold_s=3.0, cpu_release_s=2.0)
    consumer = FakeConsumer()
    held = []
    for _ in range(24):  # 12 s of a neighbour keeping the CPU at 100 %
        valve.tick(consumer, reading(cpu=100))
        held.append(bool(valve.paused))
        clock.now += 0.5
    # 3 s held, 2 s consumed, 3 s held, ...: a duty cycle, never a permanent pause.
    assert held[:6] == [True] * 6 and held[6:10] == [False] * 4 and held[10:16] == [True] * 6
    assert held.count(False) >= 8
    # Released together and re-added in -Q order.
    adds = [q for op, q in consumer.calls if op == "add"]
    assert adds[:2] == ["normal", "low"]


def test_memory_hold_has_no_release_window() -> None:
    clock = Clock()
    valve = valve_of(["low"], clock, cpu_max_hold_s=1.0, cpu_release_s=1.0)
    consumer = FakeConsumer()
    for _ in range(20):
        valve.tick(consumer, reading(memory=95, cpu=100))
        assert valve.reasons == {"low": "memory"}
        clock.now += 0.5


def test_resumed_queue_is_put_back_in_priority_order() -> None:
    clock = Clock()
    valve = valve_of(["normal", "low", "batch"], clock)
    consumer = FakeConsumer()
    valve.tick(consumer, reading(memory=85))  # low, batch paused for memory
    valve.tick(consumer, reading(memory=60, cpu=95))  # memory over; cpu critical: all three
    assert valve.paused == ["normal", "low", "batch"]
    consumer.calls.clear()
    valve.tick(consumer, reading(memory=60, cpu=60))
    assert consumer.calls == [("add", "normal"), ("add", "low"), ("add", "batch")]
    # normal released alone, then low: low must not end up ahead of batch's position rules.
    valve.tick(consumer, reading(memory=85, cpu=60))
    consumer.calls.clear()
    valve.tick(consumer, reading(memory=60, cpu=60))
    assert consumer.calls == [("add", "low"), ("add", "batch")]


# --- cgroup parsing on sample files --------------------------------------------------------


def test_parse_cgroup_files() -> None:
    assert parse_memory_max("max\n") is None
    assert parse_memory_max("1073741824\n") == 1073741824
    assert parse_memory_max("9223372036854771712") is None
    assert parse_cpu_max("max 100000") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cpu_max("50000") == 0.5
    stat = parse_flat_keyed((DATA / "limited/kubepods/pod1/memory.stat").read_text())
    assert stat["inactive_file"] == 268435456 and stat["anon"] == 600000000
    assert parse_proc_cgroup((DATA / "limited.proc_cgroup").read_text()) == "/kubepods/pod1/ctr"
    assert parse_proc_cgroup((DATA / "unlimited.proc_cgroup").read_text()) == "/"
    assert parse_proc_cgroup("4:memory:/x\n") is None
    assert find_v2_mount((DATA / "mounts").read_text()) == Path("/sys/fs/cgroup/unified")
    assert find_v2_mount("proc /proc proc rw 0 0\n") is None


def test_discover_takes_the_tightest_limit_on_the_path() -> None:
    cgroup = CgroupV2.discover(mount=DATA / "limited", relative="/kubepods/pod1/ctr")
    assert cgroup is not None and cgroup.limited
    # The pod's 1 GiB binds, not the container's 2 GiB; the container's 1.5 CPUs bind.
    assert cgroup.memory_dir == DATA / "limited/kubepods/pod1"
    assert cgroup.memory_limit_bytes == 1073741824
    assert cgroup.cpus == 1.5 and cgroup.cpu_dir == DATA / "limited/kubepods/pod1/ctr"
    # Working set: memory.current less inactive_file.
    assert cgroup.memory_used_bytes() == 805306368 - 268435456
    assert cgroup.cpu_usage_s() == pytest.approx(123.456789)


def test_discover_without_limits() -> None:
    cgroup = CgroupV2.discover(mount=DATA / "unlimited", relative="/")
    assert cgroup is not None and not cgroup.limited
    assert cgroup.memory_used_bytes() is None and cgroup.cpu_usage_s() is None


def test_discover_in_a_cgroup_namespace_falls_back_to_the_mount() -> None:
    cgroup = CgroupV2.discover(mount=DATA / "unlimited", relative="/not/visible/here")
    assert cgroup is not None and cgroup.memory_dir is None


def test_probe_uses_the_cgroup_when_it_binds() -> None:
    cgroup = CgroupV2.discover(mount=DATA / "limited", relative="/kubepods/pod1/ctr")
    m = Probe(cgroup=cgroup, exclude_own_cpu=False).measure()
    assert m.memory_source == "cgroup"
    assert m.memory_total_bytes == 1073741824
    assert m.memory_used_bytes == 536870912
    assert m.cpu_busy_s == pytest.approx(123.456789)


def test_probe_uses_the_host_without_a_binding_limit() -> None:
    cgroup = CgroupV2.discover(mount=DATA / "unlimited", relative="/")
    m = Probe(cgroup=cgroup).measure()
    assert m.memory_source == "host" and m.memory_total_bytes > 0
    assert Probe(prefer="host").measure().memory_source == "host"


# --- sampler -------------------------------------------------------------------------------


class ScriptedProbe(Probe):
    """Cumulative CPU counters that advance as the test says."""

    def __init__(self) -> None:
        super().__init__(prefer="host", cgroup=None)
        self.busy = 0.0
        self.capacity = 0.0
        self.used = 512.0 * 2**20

    def measure(self) -> Measurement:
        return Measurement(self.used, 1024.0 * 2**20, "host", self.busy, self.capacity)


def test_sampler_averages_cpu_over_its_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("taskyard.workers.guards.readings.time.monotonic", lambda: clock[0])
    probe = ScriptedProbe()
    sampler = Sampler(probe, interval_s=1.0, window_s=3.0)
    first = sampler.sample()
    assert first.cpu_pct == 0.0 and first.memory_pct == 50.0
    assert first.memory_available_mb == 512.0
    for busy_share in (1.0, 1.0, 0.0, 0.0, 0.0):
        clock[0] += 1.0
        probe.busy += 2.0 * busy_share
        probe.capacity += 2.0
        last = sampler.sample()
    # Window of 3 s: the last three seconds were idle.
    assert last.cpu_pct == 0.0
    clock[0] += 1.0
    probe.busy += 1.0
    probe.capacity += 2.0
    assert sampler.sample().cpu_pct == pytest.approx(100.0 / 6)
    assert sampler.current() is sampler.latest


def test_sampler_thread_runs_hooks_and_stops() -> None:
    probe = ScriptedProbe()
    sampler = Sampler(probe, interval_s=0.02, window_s=1.0)
    seen: list[Reading] = []
    sampler.hooks.append(seen.append)
    assert sampler.idle
    sampler.ensure_running()
    try:
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(seen) >= 3 and sampler.running
    finally:
        sampler.stop()
    assert not sampler.running


def test_real_probe_gives_plausible_readings() -> None:
    sampler = Sampler(Probe(), interval_s=0.05, window_s=1.0)
    sampler.sample()
    time.sleep(0.1)
    r = sampler.sample()
    assert 0.0 < r.memory_pct < 100.0 and 0.0 <= r.cpu_pct <= 100.0
    assert r.memory_available_mb > 0 and r.memory_source in ("host", "cgroup")


# --- deferral through a real Redis broker ---------------------------------------------------


def _queued(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """Messages published to ``queue``: its list, and (taskyard's Redis transport holds a
    countdown in Redis) its delayed set, whose members are ``"<step>:<message JSON>"``."""
    ready = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    delayed = [
        json.loads(raw.split(b":", 1)[1])
        for raw in client.zrange(f"taskyard:delayed:{queue}", 0, -1)
    ]
    return ready + delayed


@pytest.fixture
def guarded(make_app: Any) -> Any:
    app = make_app(
        "guardunit",
        guard={"defer_countdown_s": 1.0, "defer_jitter_s": 0.5, "max_defer_age_s": 60.0},
    )

    @app.task(name="unit.low", bind=True)
    def low_task(self: Any, x: int, y: int = 0) -> int:
        return x + y

    guard = guard_of(app)
    assert guard is not None
    guard.source = MemoryReadings(reading(memory=95.0))
    return app, low_task, guard


def test_deferral_republishes_same_id_args_level_and_counts(
    guarded: Any, redis_client: redis.Redis
) -> None:
    from taskyard.signals import task_deferred

    _, task, guard = guarded
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any = None, **kwargs: Any) -> None:
        seen.append({"sender": sender, **kwargs})

    task_deferred.connect(receiver, weak=False)
    try:
        task.push_request(
            id="abc-1",
            args=[1],
            kwargs={"y": 2},
            delivery_info={"routing_key": "low", "exchange": "taskyard"},
        )
        try:
            with pytest.raises(Ignore):
                task.before_start("abc-1", [1], {"y": 2})
        finally:
            task.pop_request()
    finally:
        task_deferred.disconnect(receiver)
    [message] = _queued(redis_client, "low")
    headers = message["headers"]
    assert headers["id"] == "abc-1" and headers["task"] == "unit.low"
    assert headers[HEADER_DEFERRALS] == 1 and headers[HEADER_SINCE] > time.time() - 10
    # Re-published with a countdown, not spinning hot (the delayed set keeps it as taskyard_eta).
    assert (headers.get("eta") or headers.get("taskyard_eta")) is not None
    body = json.loads(__import__("base64").b64decode(message["body"]))
    assert body[0] == [1] and body[1] == {"y": 2}
    assert guard.counters.get(DEFERRED) == 1
    assert seen == [
        {
            "sender": "unit.low",
            "task_id": "abc-1",
            "level": "low",
            "reason": "memory 95.0% above 80%",
            "deferrals": 1,
            "kind": "memory",
            "signal": task_deferred,
        }
    ]
    assert guard.counters.by_reason() == {"memory": 1, "requires_memory": 0}


def test_per_call_level_is_kept_on_deferral(guarded: Any, redis_client: redis.Redis) -> None:
    _, task, _ = guarded
    task.push_request(
        id="abc-2",
        args=[1],
        kwargs={},
        delivery_info={"routing_key": "batch"},
        **{HEADER_DEFERRALS: 3, HEADER_SINCE: time.time() - 5},
    )
    try:
        with pytest.raises(Ignore):
            task.before_start("abc-2", [1], {})
    finally:
        task.pop_request()
    [message] = _queued(redis_client, "batch")
    assert message["headers"][HEADER_DEFERRALS] == 4
    assert redis_client.llen("low") == 0


def test_overdue_task_runs_and_is_counted(
    guarded: Any, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    _, task, guard = guarded
    task.push_request(
        id="abc-3",
        args=[1],
        kwargs={},
        delivery_info={"routing_key": "low"},
        **{HEADER_DEFERRALS: 7, HEADER_SINCE: time.time() - 120},
    )
    try:
        with caplog.at_level("WARNING", logger="taskyard.guards"):
            task.before_start("abc-3", [1], {})  # no Ignore: it runs
    finally:
        task.pop_request()
    assert redis_client.llen("low") == 0
    assert guard.counters.get(OVERDUE) == 1
    assert any("overdue: deferred 7 times" in r.getMessage() for r in caplog.records)


def test_admitted_and_critical_tasks_are_not_deferred(
    guarded: Any, redis_client: redis.Redis
) -> None:
    _, task, guard = guarded
    task.push_request(id="abc-4", args=[1], kwargs={}, delivery_info={"routing_key": "critical"})
    try:
        task.before_start("abc-4", [1], {})
    finally:
        task.pop_request()
    guard.source.set(memory_pct=10.0)
    task.push_request(id="abc-5", args=[1], kwargs={}, delivery_info={"routing_key": "low"})
    try:
        task.before_start("abc-5", [1], {})
    finally:
        task.pop_request()
    assert not _queued(redis_client, "low") and guard.counters.get(DEFERRED) == 0


def test_requires_memory_defers_until_available(make_app: Any, redis_client: redis.Redis) -> None:
    from taskyard import priority_task

    app = make_app("guardneeds")

    @priority_task(priority="normal", requires_memory_mb=512)
    def needy() -> None:
        pass

    task = app.tasks[needy.name]
    guard = guard_of(app)
    assert guard is not None
    guard.source = MemoryReadings(reading(memory=10.0, available_mb=300.0))
    task.push_request(id="n-1", args=[], kwargs={}, delivery_info={"routing_key": "normal"})
    try:
        with pytest.raises(Ignore):
            task.before_start("n-1", [], {})
        guard.source.set(memory_available_mb=2048.0)
        task.before_start("n-1", [], {})
    finally:
        task.pop_request()
    assert len(_queued(redis_client, "normal")) == 1


def test_countdown_must_stay_below_the_visibility_timeout(make_app: Any) -> None:
    with pytest.raises(ConfigurationError, match="visibility timeout"):
        make_app(
            "guardbad",
            visibility_timeout_s=100.0,
            reservation_lease_s=0,
            guard={"defer_countdown_s": 60.0, "defer_jitter_s": 1.0},
        )
    # Leased reservations (the default) renew held countdown messages: no bound applies.
    make_app(
        "guardlease",
        visibility_timeout_s=100.0,
        guard={"defer_countdown_s": 60.0, "defer_jitter_s": 1.0},
    )


def test_guards_disabled_admit_everything(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("guardoff", guard={"enabled": False})

    @app.task(name="unit.off", bind=True)
    def off(self: Any) -> None:
        pass

    guard = guard_of(app)
    assert guard is not None and guard.valve is None
    guard.source = MemoryReadings(reading(memory=99.0))
    off.push_request(id="o-1", args=[], kwargs={}, delivery_info={"routing_key": "low"})
    try:
        off.before_start("o-1", [], {})
    finally:
        off.pop_request()
    assert redis_client.llen("low") == 0


# --- counters, accounting, heartbeat --------------------------------------------------------


def test_shared_counters_add_up_across_a_fork() -> None:
    import os

    counters = Counters()
    counters.share()
    counters.add(DEFERRED)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        counters.add(DEFERRED, 5)
        os._exit(0)
    os.waitpid(pid, 0)
    assert counters.get(DEFERRED) == 6


class _Task:
    def __init__(self, name: str) -> None:
        self.name = name
        self.memory_limit_mb = None
        self.cpu_time_limit_s = None


def test_accounting_merges_runs_atomically_in_redis(redis_client: redis.Redis) -> None:
    from tests import servers

    client = redis.Redis.from_url(servers.REDIS_URL)
    meters = [TaskMeter(lambda: client, "t:resources", flush_interval_s=3600) for _ in range(2)]
    for meter in meters:
        for _ in range(3):
            meter.start(_Task("app.work"), "id")
            block = bytearray(4 * 2**20)
            block[::4096] = b"\x01" * len(block[::4096])
            sum(range(20000))
            meter.stop(failed=False)
            del block
        meter.flush()
    data = json.loads(redis_client.hget("t:resources", "app.work"))
    assert data["runs"] == 6
    assert data["cpu_s"] > 0 and data["cpu_max_s"] <= data["cpu_s"]
    assert data["rss_growth_mb"] >= data["rss_growth_max_mb"] >= 0
    assert data["memory_limit_exceeded"] == 0 and data["updated_at"] > 0


def test_accounting_keeps_aggregates_when_redis_is_down() -> None:
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    meter = TaskMeter(lambda: down, "t:resources", flush_interval_s=3600)
    meter.start(_Task("app.work"), "id")
    meter.stop(failed=False)
    meter.flush()
    assert meter.pending["app.work"].sums["runs"] == 1


def test_heartbeat_record_in_redis(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("guardbeat", guard={"heartbeat_interval_s": 2.0, "heartbeat_slack_s": 3.0})
    guard = guard_of(app)
    assert guard is not None
    guard.source = MemoryReadings(reading(memory=85.0, cpu=12.5))
    guard.queues = ["critical", "low"]
    guard.heartbeat.hostname = "unit@host"
    data = guard.heartbeat.publish()
    stored = json.loads(redis_client.get("taskyard:worker:unit@host"))
    assert stored == data
    for field in (
        "hostname",
        "pid",
        "at",
        "queues",
        "paused_queues",
        "memory_pct",
        "cpu_pct",
        "memory_source",
        "memory_available_mb",
        "state",
        "deferred",
        "overdue",
    ):
        assert field in stored
    assert stored["state"] == "warning" and stored["memory_pct"] == 85.0
    assert stored["queues"] == ["critical", "low"] and stored["paused_queues"] == []
    assert 0 < redis_client.ttl("taskyard:worker:unit@host") <= 5
    assert redis_client.zscore("taskyard:workers", "unit@host") == pytest.approx(stored["at"])
    guard.heartbeat.stop(remove=True)
    assert redis_client.get("taskyard:worker:unit@host") is None
    assert redis_client.zscore("taskyard:workers", "unit@host") is None


def test_deferral_falls_back_to_requeue_when_publishing_fails(
    guarded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.canvas import Signature
    from celery.exceptions import Reject

    from taskyard.errors import BrokerUnavailable

    _, task, guard = guarded

    def fail(self: Any, *args: Any, **kwargs: Any) -> None:
        raise BrokerUnavailable("unit.low", "redis://down", "connection refused")

    monkeypatch.setattr(Signature, "apply_async", fail)
    task.push_request(id="abc-6", args=[1], kwargs={}, delivery_info={"routing_key": "low"})
    try:
        with pytest.raises(Reject) as info:
            task.before_start("abc-6", [1], {})
    finally:
        task.pop_request()
    assert info.value.requeue is True
    assert guard.counters.get(DEFERRED) == 0


@pytest.mark.parametrize("kind", ["cpu", "memory"])
def test_limit_breach_is_raised_inside_the_running_task(kind: str) -> None:
    import signal
    import threading

    from taskyard.errors import TaskCpuLimitExceeded, TaskMemoryLimitExceeded
    from taskyard.workers.guards.accounting import LIMIT_SIGNAL

    meter = TaskMeter(lambda: redis.Redis(port=1), "t:resources", flush_interval_s=3600)
    previous = signal.getsignal(LIMIT_SIGNAL)
    meter.install_enforcement()
    task = _Task("app.greedy")
    expected: type[Exception]
    if kind == "cpu":
        task.cpu_time_limit_s = 0.05  # type: ignore[assignment]
        expected = TaskCpuLimitExceeded
    else:
        task.memory_limit_mb = 50  # type: ignore[assignment]
        expected = TaskMemoryLimitExceeded
    checker = threading.Thread(target=lambda: (time.sleep(0.3), meter.check_limits()))
    try:
        meter.start(task, "id-1")
        with pytest.raises(expected) as info:
            checker.start()
            block = b"\x01" * (120 * 2**20) if kind == "memory" else b""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # burn CPU until the sampler thread stops us
                pass
            del block
        meter.stop(failed=True)
    finally:
        checker.join()
        signal.signal(LIMIT_SIGNAL, previous)
    assert info.value.task_name == "app.greedy"  # type: ignore[union-attr]
    field = f"{kind}_limit_exceeded"
    assert meter.pending["app.greedy"].sums[field] == 1
    assert meter.retire is True  # the pool child would now be replaced


def test_cpu_pressure_leaves_out_the_workers_own_processes() -> None:
    import time as _time

    from taskyard.workers.guards.readings import Probe

    own, whole = Probe("host", exclude_own_cpu=True), Probe("host", exclude_own_cpu=False)
    before_own, before_whole, before_self = own.measure(), whole.measure(), own.own_cpu_s()
    deadline = _time.process_time() + 0.4
    while _time.process_time() < deadline:  # this process (the "worker") keeps a core busy
        pass
    after_own, after_whole, after_self = own.measure(), whole.measure(), own.own_cpu_s()
    burned = after_self - before_self
    assert burned >= 0.35
    busy_own = after_own.cpu_busy_s - before_own.cpu_busy_s
    busy_whole = after_whole.cpu_busy_s - before_whole.cpu_busy_s
    # The whole-machine figure includes the loop; the worker's view leaves it out.
    assert busy_whole - busy_own >= 0.3


# --- CPU by scheduling: backoff, per-reason counts, pool priority ----------------------------


def test_deferral_backs_off_exponentially_with_jitter_up_to_the_cap() -> None:
    from taskyard.workers.guards import Deferrer

    top = Deferrer(2.0, 1.0, 600.0, Counters(), 60.0, rand=lambda a, b: b)
    assert [top.countdown(n) for n in (1, 2, 3, 4, 5, 6, 20)] == [3, 6, 12, 24, 48, 60, 60]
    bottom = Deferrer(2.0, 1.0, 600.0, Counters(), 60.0, rand=lambda a, b: a)
    assert [bottom.countdown(n) for n in (1, 2, 3)] == [2, 4, 8]
    real = Deferrer(2.0, 1.0, 600.0, Counters(), 60.0)
    spread = {round(real.countdown(3), 3) for _ in range(50)}
    assert len(spread) > 10 and all(8.0 <= c <= 12.0 for c in spread)


def test_default_backoff_cap_follows_a_short_visibility_timeout(make_app: Any) -> None:
    app = make_app(
        "guardshortvt",
        visibility_timeout_s=3.0,
        reservation_lease_s=0,
        guard={"defer_countdown_s": 0.5, "defer_jitter_s": 0.2},
    )
    guard = guard_of(app)
    assert guard is not None and guard.deferrer.max_countdown_s == pytest.approx(1.35)
    with pytest.raises(ConfigurationError, match="DEFER_MAX_COUNTDOWN_S = 30 s"):
        make_app(
            "guardbadcap",
            visibility_timeout_s=40.0,
            reservation_lease_s=0,
            guard={"defer_max_countdown_s": 30},
        )


def test_requires_memory_deferrals_are_counted_under_their_own_reason(
    make_app: Any, redis_client: redis.Redis
) -> None:
    from taskyard import priority_task

    app = make_app("guardreasons")

    @priority_task(priority="low", requires_memory_mb=4096, name="unit.reasons")
    def needs_much() -> None:
        pass

    task = app.tasks[needs_much.name]
    guard = guard_of(app)
    assert guard is not None
    guard.source = MemoryReadings(reading(memory=10.0, available_mb=100.0))
    for n in range(3):
        task.push_request(id=f"r-{n}", args=[], kwargs={}, delivery_info={"routing_key": "low"})
        try:
            with pytest.raises(Ignore):
                task.before_start(f"r-{n}", [], {})
        finally:
            task.pop_request()
    guard.source.set(memory_pct=95.0, memory_available_mb=9000.0)
    task.push_request(id="r-m", args=[], kwargs={}, delivery_info={"routing_key": "low"})
    try:
        with pytest.raises(Ignore):
            task.before_start("r-m", [], {})
    finally:
        task.pop_request()
    assert guard.counters.by_reason() == {"memory": 1, "requires_memory": 3}
    assert guard.record()["deferred_by_reason"] == {"memory": 1, "requires_memory": 3}
    assert guard.counters.get(DEFERRED) == 4


class FakeWorker:
    def __init__(self, app: Any) -> None:
        self.app = app


@pytest.mark.parametrize(
    ("queues", "nice"),
    [(["low", "batch"], 10), (["batch"], 10), (["normal", "low"], 0), (["critical"], 0)],
)
def test_only_low_and_batch_workers_run_their_pool_at_lower_priority(
    make_app: Any, queues: list[str], nice: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskyard.workers.guards import guard as guard_module

    lowered: list[int] = []
    # The test process's own session must not be slowed down.
    monkeypatch.setattr(guard_module, "lower_autogroup", lowered.append)
    app = make_app(f"guardnice{len(queues)}{nice}")
    app.amqp.queues.select(queues)
    guard = guard_of(app)
    assert guard is not None
    try:
        guard.on_worker_init(FakeWorker(app))
        assert guard.pool_nice == nice
        assert guard.record()["pool_nice"] == nice
        assert lowered == ([nice] if nice else [])
    finally:
        guard.sampler.stop()


def test_autogroup_is_left_alone_when_the_process_does_not_lead_its_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from taskyard.workers.guards import guard as guard_module

    switch = tmp_path / "switch"
    switch.write_text("1\n")
    monkeypatch.setattr(guard_module, "AUTOGROUP_SWITCH", str(switch))
    monkeypatch.setattr(os, "getsid", lambda _pid: os.getpid() + 1)
    assert guard_module.lower_autogroup(10) is False
    switch.write_text("0\n")
    assert guard_module.lower_autogroup(10) is False


def test_quiet_host_holds_nothing_back() -> None:
    clock = Clock()
    valve = valve_of(["critical", "high", "normal", "low", "batch"], clock)
    consumer = FakeConsumer()
    for cpu in (5, 40, 79, 60, 80, 30):  # at the threshold is not above it
        valve.tick(consumer, reading(memory=50, cpu=cpu))
        clock.now += 0.5
    assert consumer.calls == [] and valve.paused == [] and valve.transitions == 0
