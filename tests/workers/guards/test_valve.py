"""Resource guards: hysteresis bands and the valve that pauses and resumes queues."""

from __future__ import annotations

import pytest

from taskyard.workers.guards import (
    Band,
)
from tests.workers.guards.fakes import Clock, FakeConsumer, reading, valve_of


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
