"""Redacted arguments: withheld from what messages show, kept in what they carry."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from taskyard import ConfigurationError, create_app, priority_task
from taskyard.redaction import REDACTED, check_redact, redact_call, rule_for
from tests import servers

PATTERN = r"(?i)passw|card"


def signup(user: str, password: str, *, plan: str = "free", card: str | None = None) -> None: ...


def test_the_rule_names_positional_arguments_by_option_and_pattern() -> None:
    assert rule_for(signup, (), PATTERN) == {"a": [1]}
    assert rule_for(signup, ("user",), "") == {"a": [0], "k": ["user"]}
    assert rule_for(signup, (), "") == {}


def test_views_withhold_named_matching_and_nested_values() -> None:
    rule = rule_for(signup, ("plan",), PATTERN)
    args, kwargs = redact_call(
        ["ana", "hunter2"],
        {"plan": "pro", "card": "4111", "profile": {"Password": "x", "pets": [{"card": 1}]}},
        rule,
        PATTERN,
    )
    assert args == ["ana", REDACTED]
    assert kwargs == {
        "plan": REDACTED,
        "card": REDACTED,
        "profile": {"Password": REDACTED, "pets": [{"card": REDACTED}]},
    }


def test_deep_values_are_withheld_whole() -> None:
    deep: Any = "secret-by-depth"
    for _ in range(100):
        deep = [deep]
    args, _ = redact_call([deep], {}, {}, PATTERN)
    assert "secret-by-depth" not in json.dumps(args)


@pytest.mark.parametrize("value", [{"a": 1}, 3, ("ok", "not an identifier"), [None]])
def test_a_bad_redact_option_names_the_value(value: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"redact="):
        check_redact(value)


def test_a_bad_pattern_is_refused_when_the_app_is_made(redis_client: redis.Redis) -> None:
    with pytest.raises(ConfigurationError, match="TASKYARD_REDACT_PATTERN"):
        create_app("badpattern", redis_url=servers.REDIS_URL, redact_pattern="(")


def test_an_unknown_option_near_redact_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'redact'"):
        priority_task(redcat=("x",))


def _messages(client: redis.Redis) -> list[dict[str, Any]]:
    raw = [m for key in client.keys("normal*") for m in client.lrange(key, 0, -1)]
    return [json.loads(m) for m in raw]


@pytest.mark.parametrize("fast", [True, False], ids=["fast-publish", "celery-path"])
def test_published_messages_show_redacted_and_carry_everything(
    make_app: Any, redis_client: redis.Redis, fast: bool
) -> None:
    app = make_app("redact", fast_publish=fast, redact_pattern=PATTERN)

    @priority_task(app=app, name="redact.signup", redact=("plan",))
    def signup_task(user: str, password: str, plan: str = "free", extra: Any = None) -> None: ...

    signup_task.delay("ana", "hunter2", plan="pro", extra={"card": "4111"})
    (message,) = _messages(redis_client)
    headers = message["headers"]
    shown = headers["argsrepr"] + headers["kwargsrepr"]
    for secret in ("hunter2", "pro", "4111"):
        assert secret not in shown, shown
    assert "ana" in shown and headers["taskyard_redact"] == {"a": [1, 2], "k": ["plan"]}
    import base64

    body = json.loads(base64.b64decode(message["body"]))
    assert body[0] == ["ana", "hunter2"] and body[1] == {"plan": "pro", "extra": {"card": "4111"}}


def test_a_task_without_secrets_is_published_as_before(
    make_app: Any, redis_client: redis.Redis
) -> None:
    app = make_app("plain", redact_pattern=PATTERN)

    @priority_task(app=app, name="redact.add")
    def add(x: int, y: int) -> int:
        return x + y

    add.delay(2, 3)
    (message,) = _messages(redis_client)
    assert "taskyard_redact" not in message["headers"]
    assert message["headers"]["argsrepr"] == "(2, 3)"
