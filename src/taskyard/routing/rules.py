"""Routing rules: ordered patterns that map task names to levels.

The :class:`Router` is installed as Celery's ``task_routes``. Celery lets options given to
``apply_async`` (and a task's own ``queue``) override a route, which is exactly the precedence
taskyard promises: per call > decorator > rules > default level.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from celery import Celery

from taskyard.config import RoutingRule
from taskyard.errors import ConfigurationError
from taskyard.routing.levels import Priority, parse_level


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule ready to match: the pattern compiled once."""

    pattern: str
    level: Priority
    regex: re.Pattern[str]

    @classmethod
    def from_rule(cls, rule: RoutingRule, *, source: str = "routing rule") -> CompiledRule:
        level = parse_level(rule.level, where=f"level in {source} {rule.pattern!r}:")
        text = fnmatch.translate(rule.pattern) if rule.kind == "glob" else rule.pattern
        try:
            regex = re.compile(text)
        except re.error as exc:
            raise ConfigurationError(
                f"{source} {rule.pattern!r} is not a valid regular expression: {exc}",
                value=rule.pattern,
            ) from None
        return cls(rule.pattern, level, regex)

    def matches(self, task_name: str) -> bool:
        return self.regex.fullmatch(task_name) is not None


class Router:
    """Celery router: the decorator's level, else the first matching rule's, else the default.

    A call's own ``queue`` option needs nothing here: Celery merges call options over the route.
    """

    def __init__(self, rules: Iterable[CompiledRule], default: Priority) -> None:
        self._rules: list[CompiledRule] = list(rules)
        self.default = default
        self._lookup = lru_cache(maxsize=4096)(self._resolve)
        #: The app, to find a task sent by name only (beat, send_task) in its registry. Celery,
        #: not taskyard.runtime.TaskyardApp: the runtime imports this module.
        self.app: Celery | None = None

    @property
    def rules(self) -> tuple[CompiledRule, ...]:
        return tuple(self._rules)

    def add_rule(self, pattern: str, level: str | Priority, *, kind: str = "glob") -> None:
        """Append a rule from code; later rules lose to earlier ones."""
        rule = RoutingRule(pattern=pattern, level=str(level), kind=kind)
        self._rules.append(CompiledRule.from_rule(rule, source="routing rule"))
        self._lookup.cache_clear()

    def level_for(self, task_name: str) -> Priority:
        """Level that rules (or the default) give ``task_name``."""
        return self._lookup(task_name)

    def _resolve(self, task_name: str) -> Priority:
        for rule in self._rules:
            if rule.matches(task_name):
                return rule.level
        return self.default

    def __call__(
        self,
        name: str,
        args: Any,
        kwargs: Any,
        options: dict[str, Any],
        task: Any = None,
        **kw: Any,
    ) -> dict[str, str]:
        if task is None and self.app is not None:
            task = self.app.tasks.get(name)
        level = getattr(task, "taskyard_level", None) or self.level_for(name)
        return {"queue": level.value, "routing_key": level.value}
