"""The Prometheus rules file: valid for promtool, its own unit tests pass, and it says what the
built-in alert evaluator does (same names, thresholds, for and resolve timing)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from taskyard.config import load_settings
from taskyard.monitoring.alerts import timing_of
from tests import servers

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "taskyard-rules.yml"
RULE_TESTS = RULES_DIR / "taskyard-rules.test.yml"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is missing (scripts/ensure-prometheus.sh installs Debian's prometheus)"
        if servers.in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _seconds(duration: str | None) -> float:
    if not duration:
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600}
    return float(sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", duration)))


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    # for / keep_firing_for timing, one alert per host for three workers, the summary text.
    result = subprocess.run(
        [_promtool(), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=RULES_DIR,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_file_matches_the_built_in_rules() -> None:
    m = load_settings().monitoring
    timing = timing_of(m)
    thresholds = {
        ("HostMemoryHigh", "warning"): m.alert_memory_warning_pct,
        ("HostMemoryHigh", "critical"): m.alert_memory_critical_pct,
        ("HostCpuHigh", "warning"): m.alert_cpu_warning_pct,
        ("HostCpuHigh", "critical"): m.alert_cpu_critical_pct,
        ("QueueDepthHigh", "warning"): float(m.alert_queue_depth),
        ("SlowTaskRate", "warning"): m.alert_slow_task_rate_pct / 100.0,
        ("CacheHitRateLow", "warning"): m.alert_cache_hit_rate_pct,
        ("WorkerHeartbeatMissing", "critical"): None,
        ("RedisEvicting", "critical"): 0.0,
        ("RedisMemoryHigh", "warning"): m.alert_redis_memory_pct,
    }
    seen = set()
    for rule in _rules():
        name, severity = rule["alert"], rule["labels"]["severity"]
        seen.add((name, severity))
        expected = timing(name)
        assert _seconds(rule.get("for")) == expected.for_s, name
        assert _seconds(rule.get("keep_firing_for")) == expected.resolve_s, name
        threshold = thresholds[(name, severity)]
        if threshold is not None:
            assert f" {threshold:g}" in rule["expr"], (name, severity, rule["expr"])
    assert seen == set(thresholds)
