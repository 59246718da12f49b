"""The one JSON policy at the producer: what every path can carry, or a refusal at ``.delay()``."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.serialization import registry
from kombu.utils import json as kombu_json

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


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES)
def test_messages_decode_as_kombus_own_decoder_decodes_them(value: Any) -> None:
    for text in (kombu_json.dumps(value), json.dumps(value, ensure_ascii=False)):
        for form in (text, text.encode(), bytearray(text.encode()), memoryview(text.encode())):
            assert serialization.loads(form) == kombu_json.loads(form)


def test_kombus_typed_values_and_escaped_names_decode_as_kombu_decodes_them() -> None:
    when = datetime(2026, 12, 7, tzinfo=UTC)
    typed = {"headers": {"when": when, "id": uuid.UUID(int=7), "n": Decimal("1.5")}}
    escaped = '{"\\u005f_type__": "datetime", "__value__": "2026-12-07T00:00:00+00:00"}'
    for text in (kombu_json.dumps(typed), escaped, '{"a": "caf\\u00e9"}'):
        assert serialization.loads(text) == kombu_json.loads(text)
        assert serialization.loads(text.encode()) == kombu_json.loads(text.encode())
    assert serialization.loads(kombu_json.dumps(typed))["headers"]["when"] == when
    assert serialization.loads(escaped) == when  # the escape spells kombu's marker
    for bad in (b'{"a": "\xff"}', b"{not json", "[1,"):
        with pytest.raises(ValueError):  # UnicodeDecodeError and JSONDecodeError, as kombu's
            serialization.loads(bad)
        with pytest.raises(ValueError):
            kombu_json.loads(bad)


def test_the_apps_content_type_decodes_through_the_fast_decoder(make_app: Any) -> None:
    make_app("decoder")  # registers the serializer
    body = kombu_json.dumps([[1], {"a": None}, {"callbacks": None}])
    assert registry._decoders[serialization.CONTENT_TYPE] is serialization.loads
    assert registry.loads(body, serialization.CONTENT_TYPE, "utf-8") == [
        [1],
        {"a": None},
        {"callbacks": None},
    ]
    # What names the type in kombu's "untrusted content" errors stays "json".
    assert registry.type_to_name[serialization.CONTENT_TYPE] == "json"
