"""One dead-letter entry and one search query: plain data, shared by every store."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from taskyard.errors import DeadLetterError
from taskyard.redaction import HEADER as REDACT_HEADER
from taskyard.redaction import REDACTED, redact_call

#: Why a message is in the dead letters.
REASONS: tuple[str, ...] = ("failed", "crashed", "poison", "expired")
#: "dead": waiting for an operator; "replayed": sent again (the entry stays as the link target).
STATES: tuple[str, ...] = ("dead", "replayed")
#: Fields a search can match exactly (each has an index in the Redis store).
INDEXED: tuple[str, ...] = ("name", "queue", "reason", "exception_type", "state")
#: Message header a replayed task carries: the id of the dead entry it was sent from.
REPLAY_HEADER = "taskyard_replay_of"

_TRUNCATED = "...[truncated]"


def cap(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to at most ``limit`` characters (marked), and whether it was cut."""
    if len(text) <= limit:
        return text, False
    return text[: max(0, limit - len(_TRUNCATED))] + _TRUNCATED, True


def to_json_text(value: Any, limit: int) -> tuple[str, bool]:
    """``value`` as JSON text (``repr`` when it is not JSON-encodable), capped; and whether the
    text is a faithful, complete encoding that a replay can send again."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        exact = True
    except (TypeError, ValueError):
        text, exact = json.dumps(repr(value)), False
    text, cut = cap(text, limit)
    return text, exact and not cut


@dataclass(slots=True)
class DeadLetter:
    """A task (or a message that is not one) that will not run again without an operator."""

    id: str
    reason: str
    name: str = ""
    queue: str = ""
    state: str = "dead"
    #: JSON text of the positional and keyword arguments, capped.
    args: str = "[]"
    kwargs: str = "{}"
    #: False when args/kwargs were cut or are a repr: such an entry cannot be replayed.
    replayable: bool = True
    exception_type: str = ""
    exception: str = ""
    traceback: str = ""
    #: Deliveries of the message (1 + redeliveries counted) and runs (1 + Celery retries).
    deliveries: int = 1
    attempts: int = 1
    worker: str = ""
    #: When the task was first seen (sent, or first dead) and last died, s since epoch.
    first_at: float = 0.0
    last_at: float = 0.0
    #: How many times this id reached the dead letters.
    times: int = 1
    #: Poison only: what was wrong, the message's content type, headers and raw body (capped;
    #: ``body_encoding`` "utf-8" or "base64").
    detail: str = ""
    content_type: str = ""
    content_encoding: str = ""
    headers: dict[str, Any] = field(default_factory=dict)
    body: str = ""
    body_encoding: str = "utf-8"
    #: The dead entry this task was replayed from, if it was.
    replay_of: str = ""
    #: Set when an operator replayed the entry: the new task id and when.
    replayed_as: str = ""
    replayed_at: float = 0.0

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise DeadLetterError(
                f"reason={self.reason!r} is not allowed; expected one of {', '.join(REASONS)}",
                value=self.reason,
            )
        # Milliseconds: the Redis scripts' JSON (cjson) keeps 14 significant digits, so a
        # finer time would not survive a round trip and the index scores would drift from it.
        self.last_at = round(self.last_at or time.time(), 3)
        self.first_at = round(self.first_at or self.last_at, 3)
        self.replayed_at = round(self.replayed_at, 3)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def redacted(self, pattern: str, *, show_arguments: bool = True) -> DeadLetter:
        """This entry as it may be shown: withheld arguments (the task's redact= names, carried
        in the ``taskyard_redact`` header, and ``pattern``) as [redacted]; with
        ``show_arguments`` false (a viewer), every argument and the raw body. The stored entry
        keeps everything, so a replay runs with the real values."""
        rule = self.headers.get(REDACT_HEADER)
        headers = dict(self.headers)
        if not show_arguments:
            return replace(
                self,
                args=json.dumps([REDACTED]),
                kwargs="{}",
                body=REDACTED if self.body else "",
                body_encoding="utf-8",
                headers={**headers, "argsrepr": REDACTED, "kwargsrepr": REDACTED},
            )
        try:
            args, kwargs = redact_call(
                json.loads(self.args), json.loads(self.kwargs), rule, pattern
            )
            shown_args, shown_kwargs = json.dumps(args), json.dumps(kwargs)
        except ValueError:  # cut or a repr: nothing in it can be matched, so none of it shown
            shown_args, shown_kwargs = json.dumps([REDACTED]), "{}"
        return replace(
            self, args=shown_args, kwargs=shown_kwargs, body=self._shown_body(rule, pattern)
        )

    def _shown_body(self, rule: Any, pattern: str) -> str:
        if not self.body:
            return ""
        try:
            raw = base64.b64decode(self.body) if self.body_encoding == "base64" else self.body
            message = json.loads(raw)
        except ValueError:
            return REDACTED  # not JSON (or cut): no argument in it can be told apart
        if isinstance(message, list) and len(message) >= 2:
            args, kwargs = redact_call(message[0], message[1], rule, pattern)
            message = [args, kwargs, *message[2:]]
        else:
            message, _ = redact_call([message], {}, rule, pattern)
            message = message[0]
        text = json.dumps(message)
        return base64.b64encode(text.encode()).decode() if self.body_encoding == "base64" else text

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeadLetter:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        # cjson (the Redis scripts) writes an empty mapping as an empty list.
        if not isinstance(values.get("headers"), dict):
            values["headers"] = {}
        return cls(**values)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True, slots=True)
class Query:
    """Which entries a search, replay or purge takes: every given field must match.

    ``state`` defaults to "dead" (replayed entries are left out); None takes every state.
    Times are s since epoch, compared with the entry's last death.
    """

    name: str | None = None
    queue: str | None = None
    reason: str | None = None
    exception_type: str | None = None
    state: str | None = "dead"
    since: float | None = None
    until: float | None = None

    def __post_init__(self) -> None:
        if self.reason is not None and self.reason not in REASONS:
            raise DeadLetterError(
                f"reason={self.reason!r} is not allowed; expected one of {', '.join(REASONS)}",
                value=self.reason,
            )
        if self.state is not None and self.state not in STATES:
            raise DeadLetterError(
                f"state={self.state!r} is not allowed; expected one of {', '.join(STATES)}",
                value=self.state,
            )
        if self.since is not None and self.until is not None and self.since > self.until:
            raise DeadLetterError(
                f"since={self.since} is after until={self.until}", value=self.since
            )

    def exact(self) -> dict[str, str]:
        """The indexed fields this query fixes."""
        return {name: value for name in INDEXED if (value := getattr(self, name)) is not None}

    def matches(self, entry: DeadLetter) -> bool:
        for name, value in self.exact().items():
            if getattr(entry, name) != value:
                return False
        if self.since is not None and entry.last_at < self.since:
            return False
        return self.until is None or entry.last_at <= self.until
