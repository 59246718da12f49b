"""Broker-side delays: a countdown/ETA message waits in Redis, not in a worker's memory.

Celery's worker reserves a message with a future ETA at once and holds it unacknowledged until it
is due, so 10,000 countdown tasks fill a worker's memory, and one held past the visibility
timeout runs twice. On taskyard's Redis transport the channel's ``_put`` calls
:func:`maybe_delay` first: a message whose ``eta`` header (Celery protocol 2) lies in the future
goes into the delayed set of its queue instead of the queue's list. :func:`move_due`, run by
every worker (:class:`DelayMover`, a timer in the consumer's event loop) and by beat
(:func:`install`), pushes due messages onto their queue's priority sub-list in one Lua script.

Clocks: the score is the ETA the producer wrote (Celery computes it from the producer's clock),
and "due" is decided by the Redis server's clock (``TIME`` inside the script), so every mover
agrees on when a message is due whatever its own clock says; only producer-vs-Redis skew shifts a
start.

The moved message no longer carries its ``eta`` header (the original is kept in
``taskyard_eta``): Celery's worker treats any ETA, even a past one, as a timer entry and raises
its prefetch by one per such message until the timer fires (``celery/worker/strategy.py``
``task_message_handler``: ``qos.increment_eventually`` + ``call_at``), so a burst of due
messages would be reserved beyond the prefetch limit. Without the header a due message is an
ordinary message and the prefetch bound holds.

On RabbitMQ (or any other transport) nothing here runs: Celery's own behaviour is kept.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Any

import redis
from celery import bootsteps
from kombu.utils.json import dumps

from taskyard.keys import Keys
from taskyard.lua import Script
from taskyard.seams import Seam

# kombu internals this module relies on (checked by tests/test_seams.py).
SEAMS = (
    Seam("kombu.transport.redis.Channel", "_get_message_priority", params=("message", "reverse")),
    Seam("kombu.transport.redis.Channel", "priority", params=("n",)),
    Seam("kombu.transport.redis.Channel", "conn_or_acquire", params=("client",)),
    Seam("kombu.transport.redis.Channel", "sep", "attribute", value="\x06\x16"),
)

log = logging.getLogger("taskyard.broker.delays")

#: Header keeping the original ETA of a delayed message (the ``eta`` header is removed).
HEADER_ORIGINAL_ETA = "taskyard_eta"
#: Transport options that carry taskyard's namespace and the on/off switch to the channel.
OPTION_NAMESPACE = "taskyard_namespace"
OPTION_ENABLED = "taskyard_delays"
#: Messages one script call moves at most, so Redis is never blocked for long by a backlog.
MOVE_BATCH = 500
#: Script calls one :func:`move_due` makes at most (bounds one tick: 100,000 messages).
MOVE_ROUNDS = 200
#: Namespace of an app that does not name one (``Settings.namespace``'s default).
DEFAULT_NAMESPACE = "taskyard"
#: A mover never calls again sooner than this (s), however soon the next message is due.
MIN_TICK_S = 0.02
#: Default mover period (s); the app's ``delay_move_interval_s`` overrides it.
DEFAULT_INTERVAL_S = 0.25

#: Moves due members of every registered delayed set onto their queue's lists, atomically
#: (``move_due.lua`` says how).
MOVE = Script.from_file("taskyard.broker", "move_due.lua")


def eta_timestamp(value: Any) -> float | None:
    """Seconds since the epoch of an ``eta`` header (ISO 8601), or None when absent/unreadable.

    A naive ETA is read as the local time, as Celery's worker reads one (``to_system_tz``).
    """
    if not value or not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _options(channel: Any) -> dict[str, Any]:
    # kombu: Channel.connection is the Transport, Transport.client the kombu Connection whose
    # transport_options are the app's broker_transport_options.
    try:
        return dict(channel.connection.client.transport_options or {})
    except AttributeError:
        return {}


def maybe_delay(pipe: Any, channel: Any, queue: str, message: dict[str, Any]) -> bool:
    """Put ``message`` into ``queue``'s delayed set when its ETA is in the future.

    ``pipe`` is the channel's Redis client or a pipeline on it (executed by the caller).
    Returns True when the message went into the delayed set: the caller must not also push it
    onto the queue. A message without a future ``eta`` header is left alone (False).
    """
    headers = message.get("headers") or {}
    due = eta_timestamp(headers.get("eta"))
    if due is None or due <= time.time():
        return False
    options = _options(channel)
    if not options.get(OPTION_ENABLED):
        # Only an app that runs the movers (create_app sets the option) may park messages.
        return False
    keys = Keys(options.get(OPTION_NAMESPACE) or DEFAULT_NAMESPACE)
    # kombu internals: _get_message_priority + priority() give the step _q_for_pri names.
    step = channel.priority(channel._get_message_priority(message, reverse=False))
    stored = {
        **message,
        "headers": {**headers, "eta": None, HEADER_ORIGINAL_ETA: headers.get("eta")},
    }
    # Registry first: a set whose registration was lost would never be moved; an extra
    # registration is harmless.
    pipe.sadd(keys.delayed_queues(), queue)
    pipe.zadd(keys.delayed(queue), {f"{int(step)}:{dumps(stored)}": int(due * 1000)})
    return True


def move_due(
    client: redis.Redis,
    keys: Keys | str = DEFAULT_NAMESPACE,
    *,
    global_keyprefix: str | None = None,
    now: float | None = None,
    sep: str = "\x06\x16",
    wake_maxlen: int = 0,
) -> int:
    """Move every due delayed message onto its queue; return how many moved.

    ``client`` may be kombu's prefixing client (its prefix is then used) or a plain one with
    ``global_keyprefix`` given. ``now`` (s since the epoch) replaces the Redis clock in tests.
    ``wake_maxlen`` > 0 adds wake entries for taskyard's transport (its ``wake_maxlen``).
    Safe to run from any number of processes at once.
    """
    return move_due_next(
        client, keys, global_keyprefix=global_keyprefix, now=now, sep=sep, wake_maxlen=wake_maxlen
    )[0]


def move_due_next(
    client: redis.Redis,
    keys: Keys | str = DEFAULT_NAMESPACE,
    *,
    global_keyprefix: str | None = None,
    now: float | None = None,
    sep: str = "\x06\x16",
    wake_maxlen: int = 0,
) -> tuple[int, float | None]:
    """:func:`move_due`, also returning the seconds until the next message is due (or None)."""
    keys = keys if isinstance(keys, Keys) else Keys(keys)
    client_prefix = getattr(client, "global_keyprefix", "") or ""
    prefix = client_prefix if global_keyprefix is None else global_keyprefix
    # Every key in full: the script runner leaves keys alone, even on a prefixing client.
    key = prefix + keys.delayed_queues()
    args = [
        prefix,
        keys.delayed(""),
        sep,
        MOVE_BATCH,
        "" if now is None else int(now * 1000),
        keys.wake_stream("") if wake_maxlen > 0 else "",
        wake_maxlen,
    ]
    total = 0
    for _ in range(MOVE_ROUNDS):
        reply = MOVE(client, (key,), args)
        moved, at_ms = int(reply[0]), float(reply[1])
        earliest = reply[2] if len(reply) > 2 else None  # Lua false arrives as None
        total += moved
        if moved < MOVE_BATCH:
            break
    next_in = None if not earliest else max(0.0, (float(earliest) - at_ms) / 1000)
    return total, next_in


def scheduled_counts(
    client: redis.Redis, queues: list[str], keys: Keys | str = DEFAULT_NAMESPACE
) -> dict[str, int]:
    """Delayed (scheduled, not yet due or not yet moved) messages per queue."""
    keys = keys if isinstance(keys, Keys) else Keys(keys)
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.zcard(keys.delayed(queue))
        replies = pipe.execute()
    return {queue: int(n) for queue, n in zip(queues, replies, strict=True)}


class _Mover:
    """Runs :func:`move_due` on a kombu connection of its own, logging failures (rarely).

    Each call returns when to call again: the interval, or sooner (never under
    :data:`MIN_TICK_S`) when the next delayed message is due sooner, so a message waits for
    the mover a few milliseconds rather than up to a whole interval.
    """

    def __init__(self, app: Any, namespace: str, interval_s: float) -> None:
        self.app = app
        self.keys = Keys(namespace)
        self.interval_s = interval_s
        self.connection: Any = None
        self._last_warning = 0.0
        self.moved = 0

    def __call__(self) -> float:
        try:
            if self.connection is None:
                self.connection = self.app.connection_for_write()
            channel = self.connection.default_channel
            # kombu internal: conn_or_acquire gives a client on the channel's (sync) pool, with
            # the global_keyprefix and Sentinel handling of the transport, as restore_visible
            # uses; never the channel's async client, which may be blocked in a fetch.
            # taskyard's transport wakes idle workers through per-queue streams (wake_maxlen
            # is its option); on kombu's own transport workers poll with BRPOP and need none.
            wake = int(getattr(channel, "wake_maxlen", 0)) if hasattr(channel, "wake_key") else 0
            with channel.conn_or_acquire() as client:
                moved, next_in = move_due_next(
                    client, self.keys, wake_maxlen=wake, sep=getattr(channel, "sep", "\x06\x16")
                )
        except Exception as exc:  # the mover must never stop the event loop or beat
            now = time.monotonic()
            if now - self._last_warning > 30:
                self._last_warning = now
                log.warning("moving due delayed messages failed (retrying every tick): %r", exc)
            self.close()
            return self.interval_s
        self.moved += moved
        if next_in is None:
            return self.interval_s
        return min(self.interval_s, max(MIN_TICK_S, next_in))

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.release()
            except Exception:  # already broken; nothing left to release
                log.debug("releasing the mover connection failed", exc_info=True)


def _settings_of(app: Any) -> tuple[bool, str, float]:
    """(applies, namespace, interval) for ``app``: Redis brokers with delays switched on."""
    options = dict(app.conf.broker_transport_options or {})
    interval = float(app.conf.get("taskyard_delay_move_interval_s") or DEFAULT_INTERVAL_S)
    return (
        bool(options.get(OPTION_ENABLED)),
        str(options.get(OPTION_NAMESPACE) or DEFAULT_NAMESPACE),
        interval,
    )


class DelayMover(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: move due delayed messages from the worker's event loop (its timer)."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.entry: Any = None
        self.mover: _Mover | None = None

    def start(self, c: Any) -> None:
        applies, namespace, interval = _settings_of(c.app)
        if not applies or c.timer is None:
            return
        mover = self.mover = _Mover(c.app, namespace, interval)

        def tick() -> None:
            if self.mover is mover:
                self.entry = c.timer.call_after(mover(), tick)

        self.entry = c.timer.call_after(0, tick)
        log.info("moving due delayed messages every %g s", interval)

    def stop(self, c: Any) -> None:
        mover, self.mover = self.mover, None
        if self.entry is not None:
            self.entry.cancel()
            self.entry = None
        if mover is not None:
            mover.close()

    shutdown = stop


class BeatMover:
    """Beat-side mover: a daemon thread moving due messages while beat runs."""

    def __init__(self, app: Any, namespace: str, interval_s: float) -> None:
        self.mover = _Mover(app, namespace, interval_s)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="taskyard-delay-mover", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        delay = 0.0
        while not self.stopped.wait(delay):
            delay = self.mover()
        self.mover.close()

    def stop(self) -> None:
        self.stopped.set()


def _on_beat_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None or getattr(app, "_taskyard_delay_installed", False) is not True:
        return
    applies, namespace, interval = _settings_of(app)
    if applies:
        mover = BeatMover(app, namespace, interval)
        app._taskyard_beat_mover = mover
        mover.start()
        log.info("beat moves due delayed messages every %g s", interval)


def install(app: Any) -> None:
    """Register the worker mover (consumer bootstep) and the beat mover of ``app``."""
    from celery.signals import beat_init

    app.steps["consumer"].add(DelayMover)
    app._taskyard_delay_installed = True
    beat_init.connect(_on_beat_init, dispatch_uid="taskyard.delays.beat", weak=False)
