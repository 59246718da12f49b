"""Settings: defaults, environment, malformed values, and the Celery configuration they make."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from taskyard import ConfigurationError, create_app
from taskyard.config import Settings, load_settings
from taskyard.errors import RoutingError
from taskyard.runtime import runtime_of
from taskyard.workers.prefetch import BulkPrefetch


def test_defaults_are_embedded_friendly(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TASKYARD_REDIS_URL", "TASKYARD_BROKER_URL", "TASKYARD_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.database_url.startswith("sqlite:///")
    assert settings.effective_broker_url == settings.effective_redis_url


def test_environment_is_read_with_prefix_and_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKYARD_VISIBILITY_TIMEOUT_S", "7200")
    monkeypatch.setenv("TASKYARD_ROUTING_RULES", '[{"pattern": "a.*", "level": "low"}]')
    monkeypatch.setenv("TASKYARD_GUARD__MEMORY_WARNING_PCT", "75")
    settings = load_settings()
    assert settings.visibility_timeout_s == 7200.0
    assert settings.routing_rules[0].level == "low"
    assert settings.guard.memory_warning_pct == 75.0


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("TASKYARD_VISIBILITY_TIMEOUT_S", "soon", "valid number"),
        ("TASKYARD_VISIBILITY_TIMEOUT_S", "-1", "greater than 0"),
        ("TASKYARD_PUBLISH_MAX_RETRIES", "many", "valid integer"),
        ("TASKYARD_ROUTING_RULES", "not json", "JSON"),
        ("TASKYARD_NAMESPACE", "has space", "pattern"),
        ("TASKYARD_GUARD__MEMORY_WARNING_PCT", "150", "less than or equal to 100"),
    ],
)
def test_malformed_value_names_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert variable in message or variable.split("__")[0] in message
    assert expected.lower() in message.lower()


def test_unknown_level_in_worker_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKYARD_WORKER_PROFILES", '{"odd": ["critical", "urgent"]}')
    with pytest.raises(RoutingError, match="'urgent'"):
        create_app("x")


def test_celery_configuration_for_redis() -> None:
    app = create_app("x", redis_url="redis://127.0.0.1:6379/3", visibility_timeout_s=5000)
    conf = app.conf
    assert conf.broker_url == "redis://127.0.0.1:6379/3"
    assert conf.accept_content == ["json"] and conf.task_serializer == "taskyard-json"
    assert conf.result_accept_content == ["json"] and conf.event_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_default_queue == "normal"
    assert conf.task_default_priority == 0
    assert conf.worker_send_task_events
    assert not conf.task_send_sent_event  # taskyard batches the task-sent events itself
    assert conf.broker_transport_options["queue_order_strategy"] == "priority"
    assert conf.broker_transport_options["visibility_timeout"] == 5000


def test_celery_configuration_for_rabbitmq() -> None:
    app = create_app("x", broker_url="amqp://guest:guest@127.0.0.1:5672//")
    assert app.conf.broker_url.startswith("amqp://")
    assert "queue_order_strategy" not in app.conf.broker_transport_options
    assert [q.name for q in app.conf.task_queues] == ["critical", "high", "normal", "low", "batch"]
    assert all(q.durable for q in app.conf.task_queues)


def test_visibility_timeout_exceeds_platform_countdowns() -> None:
    settings = Settings()
    longest = max(
        settings.guard.defer_countdown_s + settings.guard.defer_jitter_s,
        settings.batch.retry_backoff_s * 2**settings.batch.max_retries,
        settings.batch.lease_s,
    )
    assert settings.visibility_timeout_s > longest


def test_celery_overrides_pass_through() -> None:
    app = create_app("x", task_time_limit=30)
    assert app.conf.task_time_limit == 30


def test_settings_reach_workers_through_the_runtime_only() -> None:
    """No taskyard value is copied into app.conf: workers read runtime_of(app).settings, so
    config.py's defaults are the only ones (a copy once fell back to 1 where config said 4)."""
    app = create_app("x", redis_url="redis://127.0.0.1:6379/3", urgent_prefetch_multiplier=3)
    assert [key for key in app.conf if str(key).startswith("taskyard_")] == []
    settings = runtime_of(app).settings
    assert settings.urgent_prefetch_multiplier == 3
    assert (
        settings.bulk_prefetch_multiplier
        == Settings.model_fields["bulk_prefetch_multiplier"].default
    )


def test_a_bulk_worker_reserves_the_configured_default() -> None:
    """The consumer step takes the multiplier from the app's runtime: config.py's 4 by default."""
    app = create_app("x", redis_url="redis://127.0.0.1:6379/3")
    app.amqp.queues.select(["low", "batch"])
    qos = SimpleNamespace(value=1, set=lambda count: None)
    consumer = SimpleNamespace(
        app=app, qos=qos, prefetch_multiplier=1, pool=SimpleNamespace(num_processes=2)
    )
    BulkPrefetch(consumer).start(consumer)
    assert consumer.prefetch_multiplier == 4
    assert qos.value == 8
