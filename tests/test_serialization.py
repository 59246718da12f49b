"""The one JSON policy at the producer: what every path can carry, or a refusal at ``.delay()``."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from taskyard import BatchItemError, TaskArgumentError, batch_task, priority_task, serialization


@priority_task(priority="high", name="t.policy")
def take(value: object) -> None: ...


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def queued(client: redis.Redis) -> int:
    return sum(int(client.llen(key)) for key in client.scan_iter("high*"))


@pytest.mark.parametrize("depth", [500, 900, 985])
def test_a_task_argument_nested_past_the_limit_is_refused_at_send(
    make_app: Any, redis_client: redis.Redis, depth: int
) -> None:
    # A prefork pool pickles arguments to its child and fails from about 480 lists deep, so such
    # a message would hold a pool slot for ever: refuse it before anything is sent.
    make_app("policy")
    with pytest.raises(TaskArgumentError, match="nested"):
        take.delay(nested(depth))
    with pytest.raises(TaskArgumentError, match="nested"):
        take.apply_async(kwargs={"value": {"a": nested(depth)}})
    assert queued(redis_client) == 0


def test_a_batch_item_nested_past_the_limit_is_refused(
    make_app: Any, redis_client: redis.Redis
) -> None:
    make_app("policy")

    @batch_task(batch_name="deep", batch_size=10, max_wait=60)
    def deep(items: list[Any]) -> None: ...

    for depth in (500, 900, 985):
        with pytest.raises(BatchItemError, match="nested"):
            deep.delay({"v": nested(depth)})


def test_a_lone_surrogate_is_refused_by_tasks_and_batches_alike(
    make_app: Any, redis_client: redis.Redis
) -> None:
    make_app("policy")

    @batch_task(batch_name="surrogate", batch_size=10, max_wait=60)
    def items(items: list[Any]) -> None: ...

    for text in ("\udcff", "a\ud800", "\ud83d\ude00"):  # the last: a pair spelled as two
        with pytest.raises(TaskArgumentError, match="surrogate"):
            take.delay(text)
        with pytest.raises(BatchItemError, match="surrogate"):
            items.delay({"t": text})
    assert queued(redis_client) == 0


def test_what_the_policy_carries() -> None:
    limit = serialization.MAX_DEPTH
    for value in (
        nested(limit - 1),
        [[i] for i in range(5 * limit)],  # many brackets, shallow
        "[" * (5 * limit),  # brackets inside a string are text
        {"k": ["\\ud800 is text, not a surrogate", "😀", "\\\\ud800"]},
    ):
        assert serialization.loads(serialization.dumps(value)) == value
    with pytest.raises(ValueError, match="nested"):
        serialization.dumps(nested(limit + 1))
    with pytest.raises(ValueError, match="nested"):
        serialization.dumps({"s": "[" * 500, "v": nested(limit + 1)})
