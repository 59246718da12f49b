"""The fast publisher (taskyard.broker.publish): the message, signals and result of Celery's path.

Each call shape is sent twice with the same task id, once by the fast path and once by Celery's
(the app's publisher switched off), and what Redis holds and what the signals carried are
compared. Calls outside the fast path are shown to take Celery's path; workers of both kinds run
what the fast path sent.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import _state, signals
from celery.result import AsyncResult
from redis.backoff import NoBackoff
from redis.retry import Retry

from taskyard import create_app, priority_task
from taskyard.broker.publish import Publisher
from taskyard.monitoring.capture import SENT_HEADER
from taskyard.runtime import runtime_of
from taskyard.testing import celery_worker, wait_until
from tests import servers
from tests.apps import fastsend
from tests.apps.fastsend_runs import RUNS_KEY

TID = "5f0c6a3e-6d2e-4f7a-9a51-0c9d3c3a1b2c"


@priority_task(priority="high", name="t.fast.notify")
def notify(user_id: int, message: str = "", **extra: Any) -> None: ...


def _limited(app: Any) -> Any:
    """A task with time limits, of ``app`` only (other tests' apps would list its limits)."""
    existing = app.tasks.get("t.fast.limited")
    if existing is not None:
        return existing

    @priority_task(
        app=app, priority="low", name="t.fast.limited", time_limit=30, soft_time_limit=20
    )
    def limited(n: int) -> None: ...

    return limited


@pytest.fixture
def fast_puts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Queues the fast path published to (kombu's path is not counted)."""
    puts: list[str] = []
    original = Publisher._put

    def counting(
        self: Publisher, link: Any, template: Any, destination: Any, queue: str, *a: Any
    ) -> None:
        puts.append(queue)
        original(self, link, template, destination, queue, *a)

    monkeypatch.setattr(Publisher, "_put", counting)
    return puts


@contextmanager
def celery_path(app: Any) -> Iterator[None]:
    """Every send of ``app`` takes Celery's path meanwhile."""
    runtime = runtime_of(app)
    publisher, runtime.publisher = runtime.publisher, None
    try:
        yield
    finally:
        runtime.publisher = publisher


@contextmanager
def recorded() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """The before/after_task_publish calls made meanwhile (their arguments, copied)."""
    calls: list[tuple[str, dict[str, Any]]] = []

    def before(**kwargs: Any) -> None:
        calls.append(("before", _plain(kwargs)))

    def after(**kwargs: Any) -> None:
        calls.append(("after", _plain(kwargs)))

    signals.before_task_publish.connect(before, weak=False, dispatch_uid="test.fast.before")
    signals.after_task_publish.connect(after, weak=False, dispatch_uid="test.fast.after")
    try:
        yield calls
    finally:
        signals.before_task_publish.disconnect(dispatch_uid="test.fast.before")
        signals.after_task_publish.disconnect(dispatch_uid="test.fast.after")


def _plain(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {key: value for key, value in kwargs.items() if key != "signal"}
    out["headers"] = {k: v for k, v in out["headers"].items() if k != SENT_HEADER}
    if "declare" in out:
        out["declare"] = [repr(entity) for entity in out["declare"]]
    if "properties" in out:
        out["properties"] = dict(out["properties"])
    return out


def _pop_messages(client: redis.Redis) -> list[dict[str, Any]]:
    """Every message on the five level lists, removed, without what differs between sends."""
    found = []
    for queue in ("critical", "high", "normal", "low", "batch"):
        while (raw := client.rpop(queue)) is not None:
            message = json.loads(raw)
            assert message["properties"].pop("delivery_tag")
            assert message["headers"].pop(SENT_HEADER)
            found.append({"queue": queue, **message})
    return found


def _both_paths(
    app: Any, client: redis.Redis, send: Callable[[Any], Any], fast_puts: list[str]
) -> tuple[Any, Any]:
    """(fast, Celery) of one send: the messages, the signal calls and the result."""
    outcomes = []
    for path in ("fast", "celery"):
        before = len(fast_puts)
        with recorded() as calls:
            if path == "fast":
                result = send(app)
            else:
                with celery_path(app):
                    result = send(app)
        assert len(fast_puts) == before + (1 if path == "fast" else 0), path
        outcomes.append((_pop_messages(client), calls, type(result), result.id, result.ignored))
    return outcomes[0], outcomes[1]


SENDS: dict[str, Callable[[Any], Any]] = {
    "no arguments": lambda app: fastsend.echo.apply_async(task_id=TID),
    "arguments": lambda app: notify.apply_async(
        (7,),
        {
            "message": "hi",
            "when": datetime(2024, 1, 2, 3, 4, 5),
            "amount": Decimal("1.50"),
            "nested": {"a": [1, None, "é"]},
        },
        task_id=TID,
    ),
    "per-call level": lambda app: notify.apply_async((7, "hi"), task_id=TID, level="critical"),
    "signature at a level": lambda app: notify.at("low").apply_async((7,), task_id=TID),
    "time limits": lambda app: _limited(app).apply_async((1,), task_id=TID),
}


@pytest.mark.parametrize("shape", sorted(SENDS))
def test_fast_message_and_signals_equal_celerys(
    make_app: Any, redis_client: redis.Redis, fast_puts: list[str], shape: str
) -> None:
    app = make_app("fastsend")
    fast, celery = _both_paths(app, redis_client, SENDS[shape], fast_puts)
    assert fast[0] == celery[0]  # the message in Redis, body bytes included
    assert len(fast[0]) == 1
    assert fast[1] == celery[1]  # before_task_publish, then after_task_publish, same arguments
    assert [name for name, _ in fast[1]] == ["before", "after"]
    assert fast[2:] == celery[2:]  # AsyncResult, its id and ignored flag
    assert fast[3] == TID


def test_result_backend_is_told_of_the_task(
    make_app: Any, redis_client: redis.Redis, fast_puts: list[str]
) -> None:
    app = make_app("fastsend-results", result_backend=servers.REDIS_URL)
    result = fastsend.echo.delay()
    assert fast_puts == ["normal"]
    # RedisBackend.on_task_call: the result is awaited on its pub/sub channel from now on.
    key = app.backend.get_key_for_task(result.id)
    assert key in app.backend.result_consumer.subscribed_to
    assert _pop_messages(redis_client)[0]["headers"]["ignore_result"] is False
    fast, celery = _both_paths(app, redis_client, SENDS["no arguments"], fast_puts)
    assert fast == celery


def test_parent_task_context(
    make_app: Any, redis_client: redis.Redis, fast_puts: list[str]
) -> None:
    app = make_app("fastsend-parent")
    parent = app.tasks["fastsend.spawn"]
    parent.push_request(id="parent-1", root_id="root-1", called_directly=False)
    _state._task_stack.push(parent)
    try:
        fast, celery = _both_paths(app, redis_client, SENDS["no arguments"], fast_puts)
        children = list(parent.request.children)
    finally:
        _state._task_stack.pop()
        parent.pop_request()
    assert fast == celery
    headers = fast[0][0]["headers"]
    assert (headers["root_id"], headers["parent_id"]) == ("root-1", "parent-1")
    assert [child.id for child in children] == [TID, TID]  # the trail, by both paths


def test_receivers_editing_the_message(
    make_app: Any, redis_client: redis.Redis, fast_puts: list[str]
) -> None:
    app = make_app("fastsend-edit")

    def add_header(headers: dict[str, Any], **_: Any) -> None:
        headers["tenant"] = "acme"

    signals.before_task_publish.connect(add_header, weak=False, dispatch_uid="test.fast.header")
    try:
        fast, celery = _both_paths(app, redis_client, SENDS["no arguments"], fast_puts)
    finally:
        signals.before_task_publish.disconnect(dispatch_uid="test.fast.header")
    assert fast == celery
    assert fast[0][0]["headers"]["tenant"] == "acme"

    # A property added by a receiver: published through kombu, the same message as Celery's.
    def add_property(properties: dict[str, Any], **_: Any) -> None:
        properties["application_headers_note"] = "kept"

    signals.before_task_publish.connect(add_property, weak=False, dispatch_uid="test.fast.prop")
    try:
        with recorded() as calls:
            fastsend.echo.apply_async(task_id=TID)
        fast_messages = _pop_messages(redis_client)
        with celery_path(app):
            fastsend.echo.apply_async(task_id=TID)
        celery_messages = _pop_messages(redis_client)
    finally:
        signals.before_task_publish.disconnect(dispatch_uid="test.fast.prop")
    assert fast_messages == celery_messages
    assert fast_messages[0]["properties"]["application_headers_note"] == "kept"
    assert [name for name, _ in calls] == ["before", "after"]


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(lambda: notify.apply_async((1,), countdown=60), id="countdown"),
        pytest.param(lambda: notify.apply_async((1,), expires=60), id="expires"),
        pytest.param(lambda: notify.apply_async((1,), priority=3), id="priority"),
        pytest.param(lambda: notify.apply_async((1,), headers={"x": 1}), id="headers"),
        pytest.param(lambda: notify.apply_async((1,), link=notify.si(2)), id="link"),
        pytest.param(lambda: notify.apply_async((1,), queue="normal", x=1), id="other options"),
    ],
)
def test_calls_with_options_take_celerys_path(
    make_app: Any, redis_client: redis.Redis, fast_puts: list[str], send: Callable[[], Any]
) -> None:
    make_app("fastsend-options")
    result = send()
    assert isinstance(result, AsyncResult)
    assert fast_puts == []
    lists = [key for key in redis_client.scan_iter() if redis_client.type(key) == b"list"]
    delayed = sum(redis_client.zcard(key) for key in redis_client.scan_iter("*delayed:*"))
    assert sum(redis_client.llen(key) for key in lists) + delayed == 1


def test_always_eager_runs_in_process(make_app: Any, fast_puts: list[str]) -> None:
    app = make_app("fastsend-eager", task_always_eager=True)
    result = fastsend.echo.delay(1, k="v")
    assert result.get() == [[1], {"k": "v"}]
    assert fast_puts == []
    assert app.conf.task_always_eager


def test_other_routes_take_celerys_path(
    make_app: Any, redis_client: redis.Redis, fast_puts: list[str]
) -> None:
    make_app("fastsend-routes", task_routes={"fastsend.*": {"queue": "low"}})
    fastsend.echo.delay()
    assert fast_puts == []
    assert redis_client.llen("low") == 1


def test_typed_arguments_checked_and_nothing_sent(
    make_app: Any, redis_client: redis.Redis, fast_puts: list[str]
) -> None:
    make_app("fastsend-typing")
    with pytest.raises(TypeError):
        notify.delay(1, "a", "too many")
    assert fast_puts == []
    assert redis_client.llen("high") == 0


def test_broken_connection_goes_through_kombu(
    make_app: Any, redis_client: redis.Redis, fast_puts: list[str]
) -> None:
    app = make_app("fastsend-broken")
    publisher = runtime_of(app).publisher
    notify.delay(1)  # the publisher's connection exists
    assert redis_client.rpop("high")
    link = publisher._local.link
    # The link's client now talks to a port nothing listens on: its publish is refused.
    link.channel.__dict__["client"] = redis.Redis(
        port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    with recorded() as calls:
        result = notify.apply_async((2,), task_id=TID)
    assert fast_puts == ["high", "high"]  # tried, refused
    assert result.id == TID
    (message,) = _pop_messages(redis_client)
    assert message["headers"]["id"] == TID
    assert [name for name, _ in calls] == ["before", "after"]  # once each
    assert publisher._local.link is not link  # dropped; the next send makes another
    notify.delay(3)
    assert publisher._local.link is not None and publisher._local.link is not link
    assert redis_client.llen("high") == 1


def test_other_brokers_have_no_fast_publisher() -> None:
    app = create_app("fastsend-amqp", broker_url="amqp://guest:guest@127.0.0.1:5672//")
    assert runtime_of(app).publisher is None
    off = create_app("fastsend-off", redis_url=servers.REDIS_URL, fast_publish=False)
    assert runtime_of(off).publisher is None


@pytest.mark.slow
def test_fast_messages_run_on_taskyard_and_plain_celery_workers(
    make_app: Any,
    redis_client: redis.Redis,
    redis_env: dict[str, str],
    fast_puts: list[str],
    tmp_path: Path,
) -> None:
    make_app("fastsend", result_backend=servers.REDIS_URL)
    env = {**redis_env, "TASKYARD_RESULT_BACKEND": servers.REDIS_URL}

    def runs() -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in redis_client.lrange(RUNS_KEY, 0, -1)]

    with celery_worker("tests.apps.fastsend", "normal", env, tmp_path, name="fast-ty"):
        result = fastsend.echo.delay(1, "two", k={"x": [3]})
        assert result.get(timeout=60) == [[1, "two"], {"k": {"x": [3]}}]
        spawned = fastsend.spawn.delay()
        child_id = spawned.get(timeout=60)
        wait_until(lambda: len(runs()) == 3, 60, message="the spawned task ran")
        # Left only once all is acknowledged, so the run count below cannot depend on how the
        # worker stops (a stop that ended a pool process before its worker acknowledged the
        # task once gave five runs of four tasks).
        wait_until(lambda: redis_client.hlen("unacked") == 0, 30, message="every ack")
    with celery_worker("tests.apps.fastsend_plain", "normal", env, tmp_path, name="fast-plain"):
        plain = fastsend.echo.delay(1, "two", k={"x": [3]})
        assert plain.get(timeout=60) == [[1, "two"], {"k": {"x": [3]}}]
        wait_until(lambda: redis_client.hlen("unacked") == 0, 30, message="every ack")
    assert fast_puts == ["normal", "normal", "normal"]
    first, spawn_run, child, on_plain = runs()
    assert first["worker"] == "taskyard" and on_plain["worker"] == "plain"
    for run, sent in ((first, result), (on_plain, plain)):
        assert run["id"] == run["root_id"] == sent.id
        assert run["parent_id"] is None
        assert (run["args"], run["kwargs"], run["queue"]) == (
            [1, "two"],
            {"k": {"x": [3]}},
            "normal",
        )
        assert run["ignore_result"] is False
    # Sent by the fast path inside a prefork child of the worker.
    assert child["id"] == child_id
    assert child["parent_id"] == child["root_id"] == spawn_run["id"] == spawned.id


def test_many_threads_send_at_once_each_on_its_own_connection(
    make_app: Any, redis_client: redis.Redis, fast_puts: list[str]
) -> None:
    """More threads than the channel's pool holds connections (kombu's max_connections, 10)
    send at once: every call is sent by the fast path and none fails. Before each thread had a
    connection of its own, the pool ran out; the thread that saw it dropped the shared one,
    and the others' calls failed on the closed channel."""
    app = make_app("fastsend-threads")
    publisher = runtime_of(app).publisher
    threads_n, each = 40, 25
    ids: list[str] = []
    errors: list[BaseException] = []
    links: list[Any] = []
    start = threading.Barrier(threads_n)

    def send() -> None:
        try:
            start.wait(30)
            for i in range(each):
                ids.append(notify.delay(i).id)
            links.append(publisher._local.link)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(fast_puts) == threads_n * each
    assert len({id(link) for link in links}) == threads_n
    queued = [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange("high", 0, -1)]
    assert sorted(queued) == sorted(ids)
    assert len(set(queued)) == threads_n * each


def test_a_thread_dropping_its_connection_leaves_the_others_alone(
    make_app: Any, redis_client: redis.Redis, fast_puts: list[str]
) -> None:
    app = make_app("fastsend-drop")
    publisher = runtime_of(app).publisher
    notify.delay(0)
    mine = publisher._local.link
    other: list[Any] = []
    dropped = threading.Event()
    sent_after = threading.Event()

    def elsewhere() -> None:
        notify.delay(1)
        other.append(publisher._local.link)
        dropped.wait(30)
        notify.delay(2)  # on its own link, still open
        other.append(publisher._local.link)
        sent_after.set()

    thread = threading.Thread(target=elsewhere)
    thread.start()
    wait_until(lambda: bool(other), 30, 0.01, "the other thread's first send")
    publisher._drop(mine)
    dropped.set()
    assert sent_after.wait(30)
    thread.join(30)
    assert other[0] is other[1] and other[0] is not mine
    assert len(fast_puts) == 3
    assert redis_client.llen("high") == 3
    publisher.close()  # every thread's link is closed; the next send opens another
    notify.delay(3)
    assert publisher._local.link is not None and publisher._local.link is not mine
    assert redis_client.llen("high") == 4


def test_delivery_tags_are_unique_uuid_text_and_a_forked_child_draws_its_own() -> None:
    import os
    import uuid

    from taskyard.broker.publish import next_delivery_tag

    tags = [next_delivery_tag() for _ in range(1000)]
    assert len(set(tags)) == 1000
    assert all(uuid.UUID(tag).version == 4 for tag in tags)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.write(write, next_delivery_tag().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child[:24] != tags[0][:24]  # another process: another random prefix


def test_settings_are_read_as_celery_reads_them(make_app: Any) -> None:
    from celery import Celery

    from taskyard.broker.publish import setting

    app = make_app("settings-read")
    conf = app.conf
    for key in ("task_always_eager", "task_send_sent_event", "task_serializer", "broker_url"):
        assert setting(conf, key) == conf[key]
    conf.task_always_eager = True  # a change at run time, as a test suite makes
    assert setting(conf, "task_always_eager") is True
    conf.task_always_eager = False
    assert setting(conf, "task_always_eager") is False
    with pytest.raises(KeyError):
        setting(conf, "no_such_setting")

    class Prefixed:
        CELERY_TASK_ALWAYS_EAGER = True

    other = Celery("prefixed", set_as_current=False)
    other.config_from_object(Prefixed, namespace="CELERY")
    assert setting(other.conf, "task_always_eager") is True  # Celery's own lookup
