"""Flow control's state in the broker's Redis: declared and run-time limits, pauses, weights,
and what the fetch reads (the compiled rules HASH). Every change rewrites the rules and adds a
wake entry, so running workers apply it on their next fetch (within about a second: idle workers
are woken by the entry, busy ones fetch again as they finish tasks).

These are the functions the command line, the API and the dashboard call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from time import time
from typing import Any

import redis

from taskyard.errors import ConfigurationError
from taskyard.flow.options import Rate, parse_concurrency, parse_rate
from taskyard.keys import Keys

#: kombu's separator between a queue's name and its priority step in list names
#: (kombu.transport.redis.Channel.sep); the step-0 list is the queue's name itself.
_PRIORITY_SEP = "\x06\x16"
#: kombu's priority steps (kombu.transport.redis.PRIORITY_STEPS): a queue's lists.
_PRIORITY_STEPS = (0, 3, 6, 9)
_PAUSE_NAME = re.compile(r"^[^\s]{1,200}$")


def glob_to_pattern(glob: str) -> str:
    """A task-name glob (``*``, ``?``) as an anchored Lua pattern for the fetch script."""
    out = ["^"]
    for char in glob:
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char in "^$()%.[]+-":
            out.append("%" + char)
        else:
            out.append(char)
    out.append("$")
    return "".join(out)


def _glob_regex(glob: str) -> re.Pattern[str]:
    return re.compile(
        "^" + ".*".join(re.escape(part) for part in glob.split("*")).replace(r"\?", ".") + "$"
    )


@dataclass(frozen=True)
class Limits:
    """Effective limits of one task: the declared ones with run-time overrides on top."""

    task: str
    rate: Rate | None
    concurrency: int | None
    partitioned: bool
    source: str  # "declared", "runtime" or "declared+runtime"

    def rule(self) -> str:
        """The rules-HASH value the fetch parses: n|period|concurrency|partitioned|burst."""
        rate = self.rate
        return "|".join(
            (
                str(rate.n if rate else 0),
                repr(rate.period_s if rate else 1.0),
                str(self.concurrency or 0),
                "1" if self.partitioned else "0",
                str(rate.burst if rate else 1),
            )
        )


class FlowStore:
    """Flow control's keys on one Redis client (the broker's database, kombu's key prefix)."""

    def __init__(self, client: redis.Redis, keys: Keys, keyprefix: str = "") -> None:
        self.client = client
        self.keys = keys
        self.keyprefix = keyprefix

    def key(self, name: str) -> str:
        return self.keyprefix + name

    # --- reading ----------------------------------------------------------------------------
    def _hash(self, name: str) -> dict[str, Any]:
        raw = self.client.hgetall(self.key(name))
        return {_text(k): json.loads(v) for k, v in raw.items()}

    def limits(self) -> list[Limits]:
        """Every task with limits or a partition, by name."""
        declared = self._hash(self.keys.flow_declared())
        overrides = self._hash(self.keys.flow_overrides())
        return [
            _merge(task, declared.get(task), overrides.get(task))
            for task in sorted(set(declared) | set(overrides))
        ]

    def pauses(self) -> list[dict[str, Any]]:
        """What is paused: kind (queue or task), name (a task glob for tasks), keys -> since."""
        out = []
        for field, keys in sorted(self._hash(self.keys.flow_pauses()).items()):
            kind, _, name = field.partition(":")
            out.append({"kind": kind, "name": name, "keys": keys, "since": min(keys.values())})
        return out

    def weights(self) -> dict[str, int]:
        raw = self.client.hgetall(self.key(self.keys.flow_weights()))
        return {_text(k): int(v) for k, v in raw.items()}

    # --- changing ---------------------------------------------------------------------------
    def declare(self, specs: Mapping[str, Mapping[str, Any]], lease_s: float | None = None) -> None:
        """Record the limits tasks' decorators declare (a worker does this at start), and the
        reservation lease after which the fetch frees a slot nobody renews."""
        if lease_s:
            self.client.hset(self.key(self.keys.flow_rules()), "lease", repr(float(lease_s)))
        if specs:
            self.client.hset(
                self.key(self.keys.flow_declared()),
                mapping={task: json.dumps(spec) for task, spec in specs.items()},
            )
        self.compile()

    def set_limits(
        self, task: str, *, rate: str | None = None, concurrency: int | None = None
    ) -> Limits:
        """Override ``task``'s rate and/or concurrency at run time ("none"/0 removes one).

        Raises:
            ConfigurationError: a malformed value (the message names the valid forms).
        """
        override = self._hash(self.keys.flow_overrides()).get(task, {})
        if rate is not None:
            override["rate"] = None if rate.lower() in ("none", "0", "") else str(parse_rate(rate))
        if concurrency is not None:
            override["concurrency"] = None if concurrency == 0 else parse_concurrency(concurrency)
        self.client.hset(self.key(self.keys.flow_overrides()), task, json.dumps(override))
        self.compile()
        return self._limits_of(task)

    def clear_limits(self, task: str) -> Limits:
        """No rate or concurrency limit for ``task`` (over what its decorator declares) until
        :meth:`reset_limits` or the next :meth:`set_limits`."""
        self.client.hset(
            self.key(self.keys.flow_overrides()),
            task,
            json.dumps({"rate": None, "concurrency": None}),
        )
        self.compile()
        return self._limits_of(task)

    def reset_limits(self, task: str) -> Limits:
        """Drop ``task``'s run-time overrides: back to what its decorator declares."""
        self.client.hdel(self.key(self.keys.flow_overrides()), task)
        self.compile()
        return self._limits_of(task)

    def set_weight(self, task: str, value: str, weight: int) -> None:
        """Fair-share weight of one partition value of ``task`` (1: the default)."""
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise ConfigurationError(
                f"weight={weight!r} is not allowed; expected an integer >= 1", value=weight
            )
        name = self.key(self.keys.flow_weights())
        if weight == 1:
            self.client.hdel(name, f"{task}|{value}")
        else:
            self.client.hset(name, f"{task}|{value}", weight)
        self.compile()

    def pause(
        self, *, queue: str | None = None, task: str | None = None, key: str = "default"
    ) -> None:
        """Pause a queue or the tasks matching a glob, on behalf of ``key``."""
        field = _pause_field(queue, task)
        _check_key(key)
        name = self.key(self.keys.flow_pauses())

        def update(pipe: Any) -> None:
            current = pipe.hget(name, field)
            keys = json.loads(current) if current else {}
            keys.setdefault(key, time())
            pipe.multi()
            pipe.hset(name, field, json.dumps(keys))

        self.client.transaction(update, name)
        self.compile()

    def resume(
        self,
        *,
        queue: str | None = None,
        task: str | None = None,
        key: str = "default",
        all_keys: bool = False,
    ) -> list[str]:
        """Withdraw ``key``'s pause (every key's with ``all_keys``); returns the keys still
        pausing it (it runs again only when none is left)."""
        field = _pause_field(queue, task)
        name = self.key(self.keys.flow_pauses())
        left: list[str] = []

        def update(pipe: Any) -> None:
            current = pipe.hget(name, field)
            keys = json.loads(current) if current else {}
            if all_keys:
                keys = {}
            else:
                keys.pop(key, None)
            left[:] = sorted(keys)
            pipe.multi()
            if keys:
                pipe.hset(name, field, json.dumps(keys))
            else:
                pipe.hdel(name, field)

        self.client.transaction(update, name)
        self.compile()
        return left

    def compile(self) -> None:
        """Rewrite the rules HASH the fetch reads from the declared limits, the overrides, the
        pauses and the weights, keeping the fetch's own r: fields; then wake waiting workers."""
        rules = self.key(self.keys.flow_rules())
        sources = [
            self.key(self.keys.flow_declared()),
            self.key(self.keys.flow_overrides()),
            self.key(self.keys.flow_pauses()),
            self.key(self.keys.flow_weights()),
        ]

        def update(pipe: Any) -> None:
            current = [_text(f) for f in pipe.hkeys(rules)]
            fields: dict[str, str] = {}
            for limits in self.limits():
                if limits.rate or limits.concurrency or limits.partitioned:
                    fields[f"t:{limits.task}"] = limits.rule()
            for pause in self.pauses():
                if pause["kind"] == "queue":
                    # The fetch skips the queue's lists: each priority step's, as kombu names it.
                    for step in _PRIORITY_STEPS:
                        name = (
                            pause["name"] if step == 0 else f"{pause['name']}{_PRIORITY_SEP}{step}"
                        )
                        fields[f"l:{self.keyprefix}{name}"] = "1"
                else:
                    fields[f"p:{glob_to_pattern(pause['name'])}"] = "1"
            for name, weight in self.weights().items():
                fields[f"w:{name}"] = str(weight)
            # r: fields and the lease are the fetch's and the workers' own.
            stale = [
                f for f in current if not f.startswith("r:") and f != "lease" and f not in fields
            ]
            pipe.multi()
            if stale:
                pipe.hdel(rules, *stale)
            if fields:
                pipe.hset(rules, mapping=fields)
            pipe.xadd(self.key(self.keys.flow_wake()), {"w": 1}, maxlen=100, approximate=True)

        self.client.transaction(update, rules, *sources)

    # --- state ------------------------------------------------------------------------------
    def _limits_of(self, task: str) -> Limits:
        for limits in self.limits():
            if limits.task == task:
                return limits
        return Limits(task, None, None, False, "none")

    def _scopes(self, task: str, partitioned: bool) -> list[str]:
        if not partitioned:
            return [task]
        pattern = self.key(self.keys.flow_slots(task + "\0")) + "*"
        prefix = len(self.key(self.keys.flow_slots("")))
        return [_text(k)[prefix:] for k in self.client.scan_iter(match=pattern, count=1000)]

    def held(self, reasons: bool = True) -> list[dict[str, Any]]:
        """Held messages by queue, task and partition value: count and why they wait (reason:
        queue_paused, task_paused, concurrency, rate, turn)."""
        rules = self.client.hgetall(self.key(self.keys.flow_rules()))
        lists = [_text(f)[2:] for f in rules if _text(f).startswith("r:")]
        out: list[dict[str, Any]] = []
        if not lists:
            return out
        limits = {lim.task: lim for lim in self.limits()}
        paused_queues = {p["name"] for p in self.pauses() if p["kind"] == "queue"}
        globs = [_glob_regex(p["name"]) for p in self.pauses() if p["kind"] == "task"]
        now = time()
        for list_key in lists:
            ring = self.key(self.keys.flow_ring(list_key))
            buckets = [_text(b) for b in self.client.zrange(ring, 0, -1)]
            if not buckets:
                continue
            pipe = self.client.pipeline(transaction=False)
            for bucket in buckets:
                pipe.llen(self.key(self.keys.flow_bucket(list_key, bucket)))
            counts = pipe.execute()
            queue = list_key[len(self.keyprefix) :].split(_PRIORITY_SEP)[0]
            for bucket, count in zip(buckets, counts, strict=True):
                if not count:
                    continue
                task, _, value = bucket.partition("\0")
                out.append(
                    {
                        "queue": queue,
                        "task": task,
                        "partition": value or None,
                        "held": int(count),
                        "reason": self._reason(
                            task, value, queue, limits.get(task), paused_queues, globs, now
                        )
                        if reasons
                        else None,
                    }
                )
        return out

    def _reason(
        self,
        task: str,
        value: str,
        queue: str,
        limits: Limits | None,
        paused_queues: set[str],
        globs: list[re.Pattern[str]],
        now: float,
    ) -> str:
        """Why a bucket waits: queue_paused, task_paused, concurrency, rate or turn (its
        fair-share turn, or a fetch has not reached it yet)."""
        if queue in paused_queues:
            return "queue_paused"
        if any(g.match(task) for g in globs):
            return "task_paused"
        if limits is None:
            return "turn"
        scope = f"{task}\0{value}" if limits.partitioned else task
        if (
            limits.concurrency
            and int(self.client.zcard(self.key(self.keys.flow_slots(scope)))) >= limits.concurrency
        ):
            return "concurrency"
        tat = self.client.get(self.key(self.keys.flow_rate(scope)))
        if limits.rate and tat is not None and float(tat) > now:
            return "rate"
        return "turn"

    def status(self) -> list[dict[str, Any]]:
        """Each limited or partitioned task: configured limits, running now (slots held),
        started in the last minute, and held (waiting) messages."""
        held: dict[str, int] = {}
        for entry in self.held():
            held[entry["task"]] = held.get(entry["task"], 0) + entry["held"]
        out = []
        slot_now = int(time() // 10)
        for limits in self.limits():
            running = sum(
                int(self.client.zcard(self.key(self.keys.flow_slots(scope))))
                for scope in self._scopes(limits.task, limits.partitioned)
            )
            started = self.client.hgetall(self.key(self.keys.flow_started(limits.task)))
            last_minute = sum(int(n) for slot, n in started.items() if slot_now - int(slot) < 6)
            out.append(
                {
                    "task": limits.task,
                    "rate": str(limits.rate) if limits.rate else None,
                    "burst": limits.rate.burst if limits.rate else None,
                    "concurrency": limits.concurrency,
                    "partitioned": limits.partitioned,
                    "source": limits.source,
                    "running": running,
                    "started_last_minute": last_minute,
                    "waiting": held.get(limits.task, 0),
                }
            )
        return out

    def held_by_queue(self, queues: Iterable[str]) -> dict[str, int]:
        """Held messages per queue (they count in the queue's depth as waiting)."""
        wanted = set(queues)
        counts = dict.fromkeys(wanted, 0)
        for entry in self.held(reasons=False):
            if entry["queue"] in wanted:
                counts[entry["queue"]] += entry["held"]
        return counts


def _merge(task: str, declared: Any, override: Any) -> Limits:
    declared = declared or {}
    merged = dict(declared)
    if override:
        merged.update(override)
    source = "+".join(
        name for name, part in (("declared", declared), ("runtime", override)) if part
    )
    return Limits(
        task=task,
        rate=parse_rate(merged["rate"]) if merged.get("rate") else None,
        concurrency=merged.get("concurrency") or None,
        partitioned=bool(declared.get("partitioned")),
        source=source or "none",
    )


def _pause_field(queue: str | None, task: str | None) -> str:
    if (queue is None) == (task is None):
        raise ConfigurationError("pause/resume takes a queue or a task name/glob, not both")
    name = queue if queue is not None else task
    assert name is not None
    if not _PAUSE_NAME.match(name):
        raise ConfigurationError(
            f"{name!r} is not allowed; expected a queue name or task glob of 1-200 characters "
            "without spaces",
            value=name,
        )
    return f"queue:{name}" if queue is not None else f"task:{name}"


def _check_key(key: str) -> None:
    if not key or len(key) > 200:
        raise ConfigurationError(f"pause key {key!r} is not allowed; expected 1-200 characters")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
