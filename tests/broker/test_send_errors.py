"""Bad input and an unreachable broker at .delay(): clear errors, nothing half-sent, no hang."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

import pytest
import redis

from taskyard import BrokerUnavailable, TaskArgumentError, priority_task
from taskyard.runtime import runtime_of
from tests.servers import REDIS_URL, RedisServer


@priority_task(priority="high", name="t.notify")
def notify(user_id: object, message: str = "") -> None: ...


def _queued(client: redis.Redis) -> int:
    return sum(int(client.llen(key)) for key in client.scan_iter("high*"))


@pytest.mark.parametrize(
    ("argument", "type_name"), [({1, 2}, "set"), (datetime.now, "builtin"), (object(), "object")]
)
def test_unencodable_argument_names_its_type(make_app, redis_client, argument, type_name) -> None:
    make_app("send-errors", redis_url=REDIS_URL)
    with pytest.raises(TaskArgumentError) as info:
        notify.delay(argument, "hi")
    assert type_name in str(info.value)
    assert "t.notify" in str(info.value)
    assert _queued(redis_client) == 0  # nothing half-sent


def test_unencodable_keyword_argument(make_app, redis_client) -> None:
    make_app("send-errors", redis_url=REDIS_URL)
    with pytest.raises(TaskArgumentError, match="set"):
        notify.apply_async((7,), {"message": {"a"}})
    assert _queued(redis_client) == 0


def test_broker_unreachable_fails_in_bounded_time(make_app) -> None:
    make_app(
        "send-errors",
        redis_url="redis://127.0.0.1:1/0",
        publish_max_retries=2,
        publish_retry_interval_s=0.1,
        broker_connect_timeout_s=0.5,
    )
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        notify.delay(7, "hi")
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert "127.0.0.1:1" in str(info.value)
    assert info.value.task_name == "t.notify"


def test_good_call_lands_on_its_queue(make_app, redis_client) -> None:
    make_app("send-errors", redis_url=REDIS_URL)
    notify.delay(7, "hi")
    assert redis_client.llen("high") == 1


@pytest.mark.parametrize("fast_publish", [True, False])
def test_a_frozen_broker_fails_in_bounded_time(
    make_app, fast_publish, redis_server: Callable[..., RedisServer]
) -> None:
    """A SIGSTOPped Redis (a paused VM, a partition without resets) answers nothing and resets
    nothing: only a read timeout on the producer's connection ends the wait."""
    with redis_server() as server:
        app = make_app("frozen", redis_url=server.url, fast_publish=fast_publish)
        notify.delay(7, "warm")  # the connection exists before the freeze
        settings = runtime_of(app).settings
        bound = (settings.publish_max_retries + 1) * (
            settings.broker_read_timeout_s + settings.publish_retry_interval_s
        ) + settings.broker_connect_timeout_s
        outcome: list[BaseException | None] = []

        def send() -> None:
            try:
                notify.delay(7, "frozen")
                outcome.append(None)
            except BaseException as exc:  # handed to the test's thread
                outcome.append(exc)

        server.freeze()
        try:
            started = time.monotonic()
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            sender.join(bound + 30)  # generous: the point is an answer, not a hang
            elapsed = time.monotonic() - started
        finally:
            server.thaw()
        assert outcome, f".delay() still blocked after {elapsed:.0f} s (bound {bound:.0f} s)"
        assert isinstance(outcome[0], BrokerUnavailable), outcome


def fill_to_maxmemory(client: redis.Redis) -> None:
    """Put Redis over its ``maxmemory`` under ``noeviction``: every write is refused."""
    for i in range(30):
        client.set(f"filler:{i}", b"x" * 100_000)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) // 2))
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("one-more", b"x")


@pytest.mark.parametrize("fast_publish", [True, False])
def test_out_of_memory_is_one_error_naming_maxmemory(
    make_app, fast_publish, redis_server: Callable[..., RedisServer]
) -> None:
    with redis_server() as server:
        make_app("oom", redis_url=server.url, fast_publish=fast_publish)
        notify.delay(7, "fits")
        fill_to_maxmemory(server.client)
        with pytest.raises(BrokerUnavailable, match="maxmemory") as sent:
            notify.delay(7, "x" * 10_000)
        assert sent.value.task_name == "t.notify"


def test_out_of_memory_under_a_batch_is_buffer_unavailable(
    make_app, redis_server: Callable[..., RedisServer]
) -> None:
    from taskyard import batch_task
    from taskyard.errors import BufferUnavailable

    with redis_server() as server:
        app = make_app("oom", redis_url=server.url)

        @batch_task(batch_name="oom", batch_size=10, max_wait=60)
        def oom_items(items: list[object]) -> None: ...

        oom_items.delay({"n": 1})
        fill_to_maxmemory(server.client)
        with pytest.raises(BufferUnavailable, match="maxmemory"):
            oom_items.delay({"n": "x" * 10_000})
        with pytest.raises(BufferUnavailable, match="maxmemory"):
            oom_items.add_many([{"n": i} for i in range(50)])
        assert server.client.llen(runtime_of(app).keys.batch_buffer("oom", "")) == 1
