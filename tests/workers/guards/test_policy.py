"""Resource guards: the level policy (what each pressure holds back) and its settings."""

from __future__ import annotations

import pytest

from taskyard.config import GuardSettings, load_settings
from taskyard.errors import ConfigurationError
from taskyard.workers.guards import (
    Policy,
    Pressure,
)
from tests.workers.guards.fakes import reading


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
