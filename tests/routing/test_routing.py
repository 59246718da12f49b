"""Levels, routing rules, @priority_task and their precedence (no broker traffic)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from taskyard import Priority, RoutingError, create_app, priority_task
from taskyard.config import RoutingRule
from taskyard.errors import ConfigurationError
from taskyard.routing import LEVEL_NAMES, parse_level
from taskyard.routing.rules import CompiledRule, Router
from taskyard.runtime import runtime_of


def route(app: Celery, task_name: str, **options: Any) -> str:
    """Queue Celery's router picks for a call of ``task_name`` with ``options``."""
    task = app.tasks.get(task_name)
    if task is not None:
        options = {**task._get_exec_options(), **options}
    return str(app.amqp.router.route(options, task_name, (), {}, task)["queue"].name)


@pytest.fixture
def app() -> Celery:
    app = create_app(
        "routing-test",
        redis_url="redis://127.0.0.1:1/0",
        routing_rules=[
            RoutingRule(pattern="bdc.security.*", level="critical"),
            RoutingRule(pattern=r"bdc\.reports\.(monthly|yearly)_.*", level="low", kind="regex"),
            RoutingRule(pattern="bdc.*", level="high"),
        ],
    )
    app.set_current()
    return app


def test_five_levels_in_order() -> None:
    assert LEVEL_NAMES == ("critical", "high", "normal", "low", "batch")
    assert [q.name for q in create_app("x").conf.task_queues] == list(LEVEL_NAMES)


@pytest.mark.parametrize("value", ["critical", "HIGH", " normal ", Priority.LOW, "batch"])
def test_parse_level_accepts_names_and_enum(value: Any) -> None:
    assert parse_level(value).value in LEVEL_NAMES


@pytest.mark.parametrize("value", ["urgent", "", None, 3, "crit"])
def test_unknown_level_names_value_and_choices(value: Any) -> None:
    with pytest.raises(RoutingError) as info:
        parse_level(value)
    message = str(info.value)
    assert repr(value) in message
    for name in LEVEL_NAMES:
        assert name in message
    assert info.value.valid == LEVEL_NAMES


@pytest.mark.parametrize("level", LEVEL_NAMES)
def test_each_level_routes_to_its_queue(app: Celery, level: str) -> None:
    @priority_task(priority=level, name=f"t.level_{level}")
    def work() -> None: ...

    assert route(app, f"t.level_{level}") == level


def test_bare_decorator_is_normal(app: Celery) -> None:
    @priority_task
    def plain() -> None: ...

    assert route(app, plain.name) == "normal"
    assert plain.taskyard_level is Priority.NORMAL


def test_glob_rule(app: Celery) -> None:
    assert route(app, "bdc.security.revoke") == "critical"


def test_regex_rule_matches_whole_name(app: Celery) -> None:
    assert route(app, "bdc.reports.monthly_beneficiaries") == "low"
    # The regex must match the whole name: this one falls through to the glob "bdc.*".
    assert route(app, "bdc.reports.weekly_summary") == "high"


def test_rules_first_match_wins_and_default_applies(app: Celery) -> None:
    assert route(app, "bdc.anything") == "high"
    assert route(app, "other.module.task") == "normal"


def test_rules_added_from_code(app: Celery) -> None:
    router = runtime_of(app).router
    router.add_rule("ops.*", "batch")
    assert route(app, "ops.cleanup") == "batch"


def test_precedence_call_over_decorator_over_rules(app: Celery) -> None:
    # A rule says "critical" for bdc.security.*, the decorator says "low".
    @priority_task(priority="low", name="bdc.security.audit_export")
    def audit_export() -> None: ...

    assert route(app, "bdc.security.audit_export") == "low"  # decorator beats rules
    assert route(app, "bdc.security.audit_export", queue="high") == "high"  # call beats decorator


def test_per_call_level_override(app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    @priority_task(priority="low", name="t.override")
    def report() -> None: ...

    sent: dict[str, Any] = {}

    def fake_send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        sent.update(options, name=name)

    monkeypatch.setattr(app, "send_task", fake_send_task)
    report.apply_async(level="critical")
    assert sent["queue"] == "critical"
    sig = report.at("high")
    assert sig.options["queue"] == "high"
    with pytest.raises(RoutingError):
        report.apply_async(level="urgent")
    with pytest.raises(RoutingError):
        report.at("urgent")


def test_stacked_on_app_task(app: Celery) -> None:
    @priority_task(priority="high")
    @app.task(name="t.legacy", shared=False)
    def legacy() -> None: ...

    assert route(app, "t.legacy") == "high"
    assert app.tasks["t.legacy"].taskyard_level is Priority.HIGH


def test_stacked_on_finalized_app_task(app: Celery) -> None:
    @app.task(name="t.legacy_finalized", shared=False)
    def legacy() -> None: ...

    app.finalize()
    placed = priority_task(priority="critical")(app.tasks["t.legacy_finalized"])
    assert placed.taskyard_level is Priority.CRITICAL
    assert route(app, "t.legacy_finalized") == "critical"
    assert legacy.name == "t.legacy_finalized"


def test_unknown_level_at_import_not_at_send() -> None:
    with pytest.raises(RoutingError, match="'urgent'"):
        priority_task(priority="urgent")


@pytest.mark.parametrize("option", ["requires_memory_mb", "memory_limit_mb", "cpu_time_limit_s"])
@pytest.mark.parametrize("value", [0, -5, "big", True])
def test_resource_options_checked_at_import(option: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=option):
        priority_task(priority="low", **{option: value})


def test_resource_options_land_on_the_task(app: Celery) -> None:
    @priority_task(priority="low", requires_memory_mb=512, cpu_time_limit_s=2.5)
    def heavy() -> None: ...

    assert heavy.requires_memory_mb == 512.0
    assert heavy.cpu_time_limit_s == 2.5
    assert heavy.memory_limit_mb is None


def test_bad_rule_level_fails_at_app_creation() -> None:
    with pytest.raises(RoutingError, match="TASKYARD_ROUTING_RULES") as info:
        create_app("bad", routing_rules=[RoutingRule(pattern="x.*", level="urgent")])
    assert "critical" in str(info.value)


def test_bad_regex_fails_at_app_creation() -> None:
    with pytest.raises(ConfigurationError, match="not a valid regular expression"):
        create_app("bad", routing_rules=[RoutingRule(pattern="(", level="low", kind="regex")])


def test_bad_default_level_fails_at_app_creation() -> None:
    with pytest.raises(RoutingError, match="TASKYARD_DEFAULT_LEVEL"):
        create_app("bad", default_level="urgent")


def test_router_caches_but_sees_new_rules() -> None:
    router = Router(
        [CompiledRule.from_rule(RoutingRule(pattern="a.*", level="low"))], Priority.NORMAL
    )
    assert router.level_for("b.x") is Priority.NORMAL
    router.add_rule("b.*", "critical")
    assert router.level_for("b.x") is Priority.CRITICAL


def test_task_sent_by_name_keeps_its_decorator_level(app: Celery) -> None:
    @priority_task(priority="critical", name="t.by_name")
    def by_name() -> None: ...

    route_ = app.amqp.router.route({}, "t.by_name", (), {}, None)
    assert route_["queue"].name == "critical"


@pytest.mark.parametrize(
    ("queues", "bulk"),
    [
        ({"normal", "low"}, True),
        ({"batch"}, True),
        ({"critical", "high"}, False),
        ({"high", "low"}, False),
        (set(), False),
    ],
)
def test_bulk_prefetch_only_without_urgent_queues(queues: set[str], bulk: bool) -> None:
    from taskyard.workers.prefetch import bulk_only

    assert bulk_only(queues) is bulk
