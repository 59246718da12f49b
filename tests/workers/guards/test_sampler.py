"""Resource guards: the sampler averaging CPU over its window, its thread, and a real probe."""

from __future__ import annotations

import time

import pytest

from taskyard.workers.guards import (
    Probe,
    Reading,
    Sampler,
)
from taskyard.workers.guards.readings import Measurement


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
