"""Flow options of the decorators: checked at import, with the valid forms; Celery's own
per-worker rate limit never applies to these tasks."""

from __future__ import annotations

from typing import Any

import pytest

from taskyard import batch_task, priority_task
from taskyard.errors import ConfigurationError
from taskyard.flow import FlowSpec, glob_to_pattern, parse_rate


@pytest.mark.parametrize(
    ("value", "n", "period", "burst"),
    [
        ("100/s", 100, 1.0, 10),
        ("20/s", 20, 1.0, 2),
        ("600/m", 600, 60.0, 1),
        (5, 5, 1.0, 1),
        ("1/h", 1, 3600.0, 1),
        (" 7 / s ", 7, 1.0, 1),
        ("500/s", 500, 1.0, 50),
    ],
)
def test_rates(value: Any, n: int, period: float, burst: int) -> None:
    rate = parse_rate(value)
    assert (rate.n, rate.period_s, rate.burst) == (n, period, burst)


@pytest.mark.parametrize("value", ["10/x", "0/s", "-1/s", "1.5/s", "s", "", 0, True, 2.5, None])
def test_bad_rates_name_the_forms(value: Any) -> None:
    with pytest.raises(ConfigurationError, match='"N/s", "N/m" or "N/h"'):
        parse_rate(value)


def test_priority_task_options(make_app: Any) -> None:
    app = make_app("flowopts")

    @priority_task(rate_limit="10/s", concurrency=3, partition_by="customer", app=app)
    def sync(customer: str, since: int = 0) -> None: ...

    spec = sync.taskyard_flow
    assert isinstance(spec, FlowSpec)
    assert (str(spec.rate), spec.concurrency, spec.partitioned) == ("10/s", 3, True)
    assert sync.rate_limit is None  # Celery's per-worker token bucket stays off
    assert spec.partition_of(("acme",), {}) == "acme"
    assert spec.partition_of((), {"customer": 7}) == "7"
    assert spec.partition_of((), {}) is None


def test_callable_partition(make_app: Any) -> None:
    app = make_app("flowopts2")

    @priority_task(partition_by=lambda order, **_: order["tenant"], app=app)
    def process(order: dict[str, str]) -> None: ...

    assert process.taskyard_flow.partition_of(({"tenant": "t1"},), {}) == "t1"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"concurrency": 0}, "integer >= 1"),
        ({"concurrency": "3"}, "integer >= 1"),
        ({"rate_limit": "fast"}, "N/s"),
        ({"partition_by": 3}, "argument name or a callable"),
        ({"partition_by": "nope"}, "names no parameter"),
        ({"concurency": 2}, "concurrency"),  # the closest valid option is named
    ],
)
def test_bad_options_raise_at_decoration(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):

        @priority_task(**options)
        def task(a: int) -> None: ...


def test_batch_task_options(make_app: Any) -> None:
    app = make_app("flowbatch")

    @batch_task(batch_name="flowb", concurrency=2, rate_limit="5/s", partition_by="key", app=app)
    def flush(items: list[Any]) -> None: ...

    spec = flush.task.taskyard_flow
    assert (str(spec.rate), spec.concurrency, spec.partitioned) == ("5/s", 2, True)
    assert flush.task.rate_limit is None
    with pytest.raises(ConfigurationError, match='expected "key"'):

        @batch_task(batch_name="flowc", partition_by="customer")
        def other(items: list[Any]) -> None: ...


def test_glob_to_lua_pattern() -> None:
    assert glob_to_pattern("billing.*") == "^billing%..*$"
    assert glob_to_pattern("a?c-d") == "^a.c%-d$"
