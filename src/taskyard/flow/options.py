"""The flow-control options of taskyard's decorators: ``rate_limit``, ``concurrency``,
``partition_by``; checked when the decorated module is imported."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskyard.errors import ConfigurationError

#: The header that carries a call's partition value to the fetch (set when the task is sent).
PARTITION_HEADER = "taskyard_partition"

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|h)\s*$")
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE_FORMS = 'a string "N/s", "N/m" or "N/h" with N an integer >= 1 (e.g. "100/s")'


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``n`` reservations per ``period_s`` seconds, cluster-wide (per scope)."""

    n: int
    period_s: float

    @property
    def burst(self) -> int:
        """Reservations allowed at once above the steady rate: a tenth of a second's worth,
        at least one. Any one-second window holds at most the per-second rate plus this."""
        return max(1, math.ceil(self.n / self.period_s / 10))

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.period_s)
        return f"{self.n}/{unit}" if unit else f"{self.n}/{self.period_s:g}s"


def parse_rate(value: Any, setting: str = "rate_limit") -> Rate:
    """``"100/s"`` (or ``/m``, ``/h``; a bare positive integer means per second) -> Rate.

    Raises:
        ConfigurationError: anything else, naming the valid forms.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return Rate(value, 1.0)
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ConfigurationError(
            f"{setting}={value!r} is not allowed; expected {_RATE_FORMS}",
            setting=setting,
            value=value,
        )
    return Rate(int(match.group(1)), _PERIODS[match.group(2)])


def parse_concurrency(value: Any, setting: str = "concurrency") -> int:
    """A positive integer.

    Raises:
        ConfigurationError: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"{setting}={value!r} is not allowed; expected an integer >= 1 (tasks running at "
            "once across the cluster)",
            setting=setting,
            value=value,
        )
    return value


@dataclass(frozen=True)
class FlowSpec:
    """A task's flow-control options as its decorator declared them."""

    rate: Rate | None = None
    concurrency: int | None = None
    #: An argument name, a callable of the call's arguments, or None.
    partition_by: str | Callable[..., Any] | None = None
    #: The parameters of the task's function (to find a named argument among positional ones).
    parameters: tuple[str, ...] = ()

    @property
    def partitioned(self) -> bool:
        return self.partition_by is not None

    def as_json(self) -> dict[str, Any]:
        """What the fetch needs to know, as stored in Redis (the declared limits)."""
        return {
            "rate": str(self.rate) if self.rate else None,
            "concurrency": self.concurrency,
            "partitioned": self.partitioned,
        }

    def partition_of(self, args: Any, kwargs: Any) -> str | None:
        """The partition value of one call (None: the call has no such argument)."""
        by = self.partition_by
        if by is None:
            return None
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        if callable(by):
            value = by(*args, **kwargs)
        elif by in kwargs:
            value = kwargs[by]
        elif by in self.parameters and self.parameters.index(by) < len(args):
            value = args[self.parameters.index(by)]
        else:
            return None
        return value if isinstance(value, str) else str(value)


def take_flow_options(
    decorator: str, options: dict[str, Any], fn: Any = None, *, partition_forms: str = ""
) -> FlowSpec | None:
    """Remove ``rate_limit``, ``concurrency`` and ``partition_by`` from ``options`` and check
    them; None when none was given. ``rate_limit`` is taskyard's (cluster-wide), so Celery's
    per-worker token bucket never sees it.

    Raises:
        ConfigurationError: a value is malformed (the message names the valid forms), or
            ``partition_by`` names no parameter of ``fn``.
    """
    rate = options.pop("rate_limit", None)
    concurrency = options.pop("concurrency", None)
    partition_by = options.pop("partition_by", None)
    if rate is None and concurrency is None and partition_by is None:
        return None
    parameters: tuple[str, ...] = ()
    if fn is not None and callable(fn):
        try:
            parameters = tuple(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            parameters = ()
    if partition_by is not None:
        if isinstance(partition_by, str):
            if (
                parameters
                and partition_by not in parameters
                and not any(
                    inspect.signature(fn).parameters[p].kind is inspect.Parameter.VAR_KEYWORD
                    for p in parameters
                )
            ):
                raise ConfigurationError(
                    f"{decorator}: partition_by={partition_by!r} names no parameter of "
                    f"{getattr(fn, '__name__', fn)!r} (it has {', '.join(parameters) or 'none'})",
                    setting="partition_by",
                    value=partition_by,
                )
        elif not callable(partition_by):
            raise ConfigurationError(
                f"{decorator}: partition_by={partition_by!r} is not allowed; expected "
                + (
                    partition_forms
                    or "an argument name or a callable of the call's arguments returning a string"
                ),
                setting="partition_by",
                value=partition_by,
            )
    return FlowSpec(
        rate=parse_rate(rate) if rate is not None else None,
        concurrency=parse_concurrency(concurrency) if concurrency is not None else None,
        partition_by=partition_by,
        parameters=parameters,
    )
