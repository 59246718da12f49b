"""Every entrance is strict: each mistake that used to pass silently raises, naming the value."""

from __future__ import annotations

import inspect
import math
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from celery import Celery

from taskyard import (
    BatchItemError,
    BrokerUnavailable,
    ConfigurationError,
    TaskArgumentError,
    batch_task,
    create_app,
    priority_task,
)
from taskyard.config import load_settings
from taskyard.errors import BatchError, BufferUnavailable
from taskyard.routing.options import _AUTORETRY_OPTIONS, _exec_options, celery_task_options
from taskyard.runtime import current_taskyard_app, runtime_of


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# --- decorators ---------------------------------------------------------------------------


def test_priority_task_unknown_option_names_the_closest() -> None:
    with pytest.raises(ConfigurationError) as info:
        priority_task(priorty="high")
    message = str(info.value)
    assert "unknown option priorty='high'" in message
    assert "did you mean 'priority'?" in message
    assert info.value.setting == "priorty"


def test_batch_task_unknown_option_names_the_closest() -> None:
    with pytest.raises(ConfigurationError) as info:
        batch_task(batchsize=10)
    assert "@batch_task got an unknown option batchsize=10" in str(info.value)
    assert "did you mean 'batch_size'?" in str(info.value)


def test_batch_task_refuses_bind_and_base() -> None:
    with pytest.raises(ConfigurationError, match="bind= is not allowed here"):
        batch_task(bind=True)
    with pytest.raises(ConfigurationError, match="base= is not allowed here"):
        priority_task(base=object)


def test_celery_task_options_stay_allowed(make_app: Any) -> None:
    app = make_app("strict-options")

    @priority_task(
        priority="high",
        name="strict.celery_options",
        bind=True,
        max_retries=2,
        autoretry_for=(ValueError,),
        retry_backoff=True,
        rate_limit="10/s",
        time_limit=30,
        soft_time_limit=20,
        acks_late=True,
        ignore_result=True,
        serializer="json",
        default_retry_delay=1,
        track_started=False,
        max_deliveries=3,
    )
    def options(self: Any) -> None: ...

    task = app.tasks["strict.celery_options"]
    # rate_limit= is taskyard's cluster-wide limit (docs/flow.md): Celery's per-worker bucket
    # stays off, the limit is the task's flow spec.
    assert (task.max_retries, task.rate_limit, task.time_limit) == (2, None, 30)
    assert task.taskyard_flow is not None and task.taskyard_flow.rate is not None
    assert task.autoretry_for == (ValueError,) and task.taskyard_level.value == "high"

    @batch_task(
        batch_name="strict_opts", name="strict.batch_options", time_limit=60, rate_limit="5/s"
    )
    def batched(items: list[Any]) -> None: ...

    flush = app.tasks["strict.batch_options"]
    assert flush.time_limit == 60 and flush.acks_late and flush.reject_on_worker_lost


def test_allowed_options_are_derived_from_celery() -> None:
    # The seams of routing.options: Celery's own names for the decorator's options.
    allowed = celery_task_options()
    for name in inspect.signature(Celery._task_from_fun).parameters:
        if name not in ("self", "fun", "options"):
            assert name in allowed
    source = inspect.getsource(__import__("celery.app.autoretry", fromlist=["x"]))
    for name in _AUTORETRY_OPTIONS:
        assert f"'{name}'" in source, name
    assert {"queue", "routing_key", "expires", "priority"} <= set(_exec_options())
    assert "request" not in allowed and "MaxRetriesExceededError" not in allowed


# --- create_app and the environment --------------------------------------------------------


def test_create_app_unknown_keyword_names_the_closest() -> None:
    with pytest.raises(ConfigurationError) as info:
        create_app("strict", redis_ur="redis://127.0.0.1:6379/0")
    message = str(info.value)
    assert "redis_ur=" in message and "neither a taskyard setting nor a Celery setting" in message
    assert "did you mean 'redis_url'?" in message


def test_create_app_takes_celery_settings_old_and_new() -> None:
    assert create_app("strict", task_time_limit=30).conf.task_time_limit == 30
    assert create_app("strict", worker_max_tasks_per_child=5).conf.worker_max_tasks_per_child == 5


@pytest.mark.parametrize(
    ("variable", "closest"),
    [
        ("TASKYARD_VISIBILITY_TIMOUT_S", "TASKYARD_VISIBILITY_TIMEOUT_S"),
        ("TASKYARD_GUARD__MEMORY_WARNINGPCT", "TASKYARD_GUARD__MEMORY_WARNING_PCT"),
        ("TASKYARD_BATCH__MAXBUFFERED", "TASKYARD_BATCH__MAX_BUFFERED"),
    ],
)
def test_unknown_variable_names_the_closest(
    monkeypatch: pytest.MonkeyPatch, variable: str, closest: str
) -> None:
    monkeypatch.setenv(variable, "10")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert str(info.value) == f"unknown setting {variable}; did you mean {closest!r}?"
    assert info.value.setting == variable


def test_variables_that_are_not_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKYARD_TEST_SOMETHING", "1")
    monkeypatch.setenv("TASKYARD_BIND", "0.0.0.0")
    monkeypatch.setenv("TASKYARD_CACHE__TTL_S__USER", "60")  # a key of a mapping setting
    assert load_settings().cache.ttl_s["user"] == 60


def test_unknown_section_field_given_as_keyword() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(guard={"memory_warningpct": 75})
    assert "unknown setting TASKYARD_GUARD__MEMORY_WARNINGPCT" in str(info.value)
    assert "did you mean 'TASKYARD_GUARD__MEMORY_WARNING_PCT'?" in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("TASKYARD_REDIS_URL", "localhost:6379", "Redis URL 'localhost:6379' has no scheme"),
        ("TASKYARD_REDIS_URL", "http://x", "Redis URL 'http://x' has scheme 'http'"),
        ("TASKYARD_REDIS_URL", "sentinel://x:26379", "is a Sentinel URL"),
        ("TASKYARD_BROKER_URL", "foo://x", "broker URL 'foo://x' has scheme 'foo'"),
        ("TASKYARD_BROKER_URL", "unix:///tmp/r.sock", "has scheme 'unix'"),
        ("TASKYARD_DATABASE_URL", "foo://x", "is not a SQLAlchemy URL of an installed dialect"),
        ("TASKYARD_HISTORY_DATABASE_URL", "not a url", "is not a SQLAlchemy URL"),
        ("TASKYARD_RESULT_BACKEND", "reddis://h/1", "result backend 'reddis://h/1' has scheme"),
        ("TASKYARD_RESULT_BACKEND", "redis", "result backend 'redis' has no scheme"),
        ("TASKYARD_RESULT_BACKEND", "db://h/x", "has scheme 'db'; expected"),
        ("TASKYARD_RESULT_BACKEND", "db+nope://h/x", "is not a SQLAlchemy URL"),
        ("TASKYARD_RESULT_BACKEND", "postgresql://h/x", "has scheme 'postgresql'"),
    ],
)
def test_url_scheme_checked_for_its_role(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert expected in str(info.value)
    assert info.value.setting == variable


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKYARD_REDIS_URL", "rediss://h:6380/0"),
        ("TASKYARD_REDIS_URL", "unix:///tmp/redis.sock"),
        ("TASKYARD_REDIS_URL", "redis+socket:///tmp/redis.sock"),
        ("TASKYARD_BROKER_URL", "sentinel://h:26379"),
        ("TASKYARD_BROKER_URL", "amqps://guest:guest@h:5671//"),
        ("TASKYARD_BROKER_URL", "pyamqp://guest:guest@h//"),
        ("TASKYARD_DATABASE_URL", "postgresql+psycopg2://postgres@h:5432/test"),
        ("TASKYARD_RESULT_BACKEND", "redis://h:6379/1"),
        ("TASKYARD_RESULT_BACKEND", "redis+socket:///tmp/redis.sock"),
        ("TASKYARD_RESULT_BACKEND", "rpc://"),
        ("TASKYARD_RESULT_BACKEND", "db+postgresql+psycopg2://postgres@h:5432/test"),
        ("TASKYARD_RESULT_BACKEND", "db+sqlite:///results.db"),
        ("TASKYARD_RESULT_BACKEND", "cache+memcached://h:11211/"),
        ("TASKYARD_RESULT_BACKEND", "s3://bucket"),
        ("TASKYARD_RESULT_BACKEND", "myapp.backends:Custom://h"),
    ],
)
def test_valid_urls_accepted(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    load_settings()


def test_result_backend_error_names_the_allowed_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.app.backends import BACKEND_ALIASES

    monkeypatch.setenv("TASKYARD_RESULT_BACKEND", "reddis://h/1")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert "'reddis://h/1'" in message and "did you mean 'redis'?" in message
    assert "db+<SQLAlchemy URL>" in message
    for alias in set(BACKEND_ALIASES) - {"db", "database"}:
        assert f"{alias}://" in message
    assert info.value.setting == "TASKYARD_RESULT_BACKEND"


def test_every_celery_backend_alias_accepted() -> None:
    from celery.app.backends import BACKEND_ALIASES

    for alias in set(BACKEND_ALIASES) - {"db", "database"}:
        assert load_settings(result_backend=f"{alias}://h").result_backend == f"{alias}://h"


def test_sentinel_redis_url_refused_saying_which_part_and_why() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(redis_url="sentinel://h:26379/0")
    message = str(info.value)
    assert "Sentinel is supported for the broker only" in message
    assert "batch buffers, cache, live stats" in message and "master name" in message
    assert "sentinel:// URL as TASKYARD_BROKER_URL" in message
    # What it advises works: the master for taskyard's Redis, Sentinel for the broker.
    settings = load_settings(redis_url="redis://h:6379/0", broker_url="sentinel://h:26379/0")
    assert settings.effective_broker_url == "sentinel://h:26379/0"


def test_redis_py_takes_no_sentinel_url() -> None:
    """The seam the refusal above rests on: taskyard's Redis client is ``Redis.from_url``."""
    import redis

    with pytest.raises(ValueError, match="redis://, rediss://, unix://"):
        redis.Redis.from_url("sentinel://127.0.0.1:26379/0")


def test_unix_redis_url_is_a_socket_broker() -> None:
    settings = load_settings(redis_url="unix:///tmp/redis.sock")
    assert settings.effective_broker_url == "redis+socket:///tmp/redis.sock"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('{"taskyard.cache.warm": -5}', "greater than or equal to 1"),
        ('{"taskyard.cache.warm": 0}', "greater than or equal to 1"),
        ('{"taskyard.cache.warm": 0.5}', "greater than or equal to 1"),
        ('{"taskyard.cache.warm": "nan"}', "finite number"),
    ],
)
def test_beat_intervals_positive_and_finite(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("TASKYARD_SCHEDULE__INTERVALS_S", value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert "TASKYARD_SCHEDULE__INTERVALS_S" in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1"])
def test_timeouts_positive_and_finite(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TASKYARD_VISIBILITY_TIMEOUT_S", value)
    with pytest.raises(ConfigurationError, match="TASKYARD_VISIBILITY_TIMEOUT_S"):
        load_settings()


def test_nan_refused_in_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKYARD_BATCH__LEASE_S", "nan")
    with pytest.raises(ConfigurationError, match=r"TASKYARD_BATCH__LEASE_S='nan'.*finite number"):
        load_settings()


# --- one error per failure, one JSON policy ------------------------------------------------


@priority_task(priority="high", name="strict.notify")
def notify(value: Any) -> None: ...


@batch_task(batch_name="strict_items", batch_size=10, max_wait=60)
def collect(items: list[Any]) -> None: ...


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, {"x": [1.0, math.nan]}])
def test_nan_refused_for_tasks_and_batches_alike(
    make_app: Any, redis_client: redis.Redis, value: Any
) -> None:
    make_app("strict-json")
    with pytest.raises(TaskArgumentError, match=r"strict\.notify.*Out of range float"):
        notify.delay(value)
    with pytest.raises(BatchItemError, match=r"strict_items.*Out of range float"):
        collect.delay(value)
    assert redis_client.llen("high") == 0 and not redis_client.keys("*strict_items*")


def test_deep_nesting_is_an_item_error(make_app: Any, redis_client: redis.Redis) -> None:
    make_app("strict-json")
    deep = _nested(100_000)
    with pytest.raises(BatchItemError, match="nested too deeply"):
        collect.delay(deep)
    with pytest.raises(BatchItemError, match="nested too deeply"):
        collect.add_many([1, deep])
    with pytest.raises(TaskArgumentError, match=r"strict\.notify"):
        notify.delay(deep)


def test_same_types_round_trip_for_tasks_and_batches(
    make_app: Any, redis_client: redis.Redis
) -> None:
    # kombu's JSON types (datetime here) go through batch items as they go through arguments.
    app = make_app("strict-json", task_always_eager=True)
    seen: list[Any] = []

    @batch_task(batch_name="strict_dates", batch_size=2, max_wait=60, app=app)
    def dates(items: list[Any]) -> None:
        seen.extend(items)

    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    dates.add_many([{"at": when}, {"at": when}])
    assert seen == [{"at": when}, {"at": when}]


def test_batch_with_redis_down_raises_broker_unavailable(make_app: Any) -> None:
    make_app("strict-down", redis_url="redis://127.0.0.1:1/0", broker_connect_timeout_s=0.5)
    for call in (
        lambda: collect.delay({"a": 1}),
        lambda: collect.add_many([{"a": 1}]),
        collect.flush,
    ):
        with pytest.raises(BrokerUnavailable) as info:
            call()
        assert isinstance(info.value, BufferUnavailable) and isinstance(info.value, BatchError)
        assert "batch 'strict_items'" in str(info.value) and "127.0.0.1:1" in str(info.value)
        assert "items were not accepted" in str(info.value)


def test_busy_loading_is_a_connection_error() -> None:
    # Redis answering LOADING (a restart reading its dump) is one of the errors the batch path
    # turns into BufferUnavailable, through redis-py's ConnectionError.
    assert issubclass(redis.exceptions.BusyLoadingError, redis.exceptions.ConnectionError)


# --- decorators bind to their taskyard app --------------------------------------------------


def test_plain_app_created_later_does_not_take_the_tasks(make_app: Any) -> None:
    app = make_app("strict-bind")
    plain = Celery("plain-after", broker="memory://")
    try:
        assert current_taskyard_app() is app
        assert notify._get_current_object().app is app
        assert collect.state().app is app
        seen: list[Any] = []

        def producer() -> None:
            seen.append((notify._get_current_object().app, collect.state().app))

        thread = threading.Thread(target=producer)
        thread.start()
        thread.join()
        assert seen == [(app, app)]
        assert "strict.notify" not in plain.tasks  # plain apps do not get taskyard's tasks
    finally:
        app.set_current()
        plain.close()


def test_app_option_pins_the_task(make_app: Any) -> None:
    first = make_app("strict-first")

    @priority_task(priority="low", name="strict.pinned", app=first)
    def pinned() -> None: ...

    make_app("strict-second")
    assert pinned.app is first and pinned.name in first.tasks
    with pytest.raises(ConfigurationError, match=r"was not made by taskyard\.create_app"):
        priority_task(app=Celery("plain-pin", broker="memory://"))(lambda: None)


def test_runtime_owns_the_guard_and_sent_events(make_app: Any) -> None:
    app = make_app("strict-runtime")
    runtime = runtime_of(app)
    assert runtime.guard is not None and runtime.sent_events is not None
    assert runtime.capture is not None
    for private in ("_taskyard_guard", "_taskyard_sent_events", "_taskyard_capture"):
        assert not hasattr(app, private)


@pytest.mark.parametrize(
    ("variable", "value", "job"),
    [
        ("TASKYARD_SCHEDULE__INTERVALS_S", '{"taskyard.cache.wram": 60}', "taskyard.cache.wram"),
        (
            "TASKYARD_SCHEDULE__DISABLED",
            '["taskyard.maintenance.runn"]',
            "taskyard.maintenance.runn",
        ),
    ],
)
def test_schedule_job_names_checked(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, job: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        create_app("strict-schedule")
    message = str(info.value)
    assert f"{variable} names {job!r}, which is not a periodic job of the platform" in message
    assert "did you mean 'taskyard." in message and info.value.setting == variable


def test_schedule_accepts_real_job_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKYARD_SCHEDULE__INTERVALS_S", '{"taskyard.cache.warm": 60}')
    monkeypatch.setenv("TASKYARD_SCHEDULE__DISABLED", '["taskyard.maintenance.run"]')
    create_app("strict-schedule")


def test_maintained_metadata_is_empty_by_default(make_app: Any) -> None:
    from taskyard.maintenance import run_maintenance

    runtime = runtime_of(make_app("strict-maint"))
    assert runtime.settings.maintenance.metadata == ""
    report = run_maintenance(runtime)
    assert report.status == "skipped"
    assert "TASKYARD_MAINTENANCE__METADATA is not set" in (report.reason or "")


def test_guard_hooks_reach_the_tasks_through_the_app_task_class() -> None:
    # The seam of workers/guards/install.py: Celery's tracer calls before_start/after_return
    # only when a class below celery.Task defines them (celery.app.trace.task_has_custom).
    from celery.app.trace import task_has_custom

    from taskyard.routing.task import TaskyardTask

    assert "before_start" not in vars(TaskyardTask) and "after_return" not in vars(TaskyardTask)
    guarded = create_app("strict-hooks", redis_url="redis://127.0.0.1:1/0")
    bare = create_app(
        "strict-hooks-off",
        redis_url="redis://127.0.0.1:1/0",
        guard={"enabled": False, "accounting": False},
    )

    @priority_task(name="strict.hooked", app=guarded)
    def hooked() -> None: ...

    @priority_task(name="strict.unhooked", app=bare)
    def unhooked() -> None: ...

    assert task_has_custom(guarded.tasks["strict.hooked"], "before_start")
    assert task_has_custom(guarded.tasks["strict.hooked"], "after_return")
    assert not task_has_custom(bare.tasks["strict.unhooked"], "before_start")
