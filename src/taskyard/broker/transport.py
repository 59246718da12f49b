"""taskyard's Redis transport: kombu's, with one atomic fetch, batched acks and leases.

A subclass of ``kombu.transport.redis.Transport`` selected by the app's ``broker_transport``
setting (which Celery passes to ``kombu.Connection`` ahead of the URL scheme), so plain
``celery -A app worker -Q ...`` and every producer of the app use it. What changes:

* One Redis client per channel, reused by every command (kombu builds a new ``redis.Redis``
  per call in ``conn_or_acquire``), producers included.
* A fetch is one Lua call (``broker/fetch.lua``): it applies the acks gathered
  since the last fetch, pops from the first non-empty list in ``-Q`` order (each queue's
  priority sub-lists, then the next queue's) and records the message in kombu's own
  ``unacked`` HASH and ``unacked_index`` ZSET in the same step, so no message is lost between
  pop and record. Only when every list is empty does the channel block, on ``XREAD`` of the
  queues' wake streams from ids read by that same call; producers add a wake entry when they
  make a list non-empty, and the read times out after ``brpop_timeout`` (1 s) for messages
  pushed by other producers.
* A channel refills its reservations in steps: it fetches when it holds nothing or at least
  half its prefetch is free (:meth:`QoS.fetch_due`), so one fetch brings several messages
  instead of one round trip per finished task.
* Acks are carried on the next fetch; a hub timer (``ack_flush_delay``, 5 ms) applies them
  when no fetch follows in time, and closing the channel applies the rest (a clean stop
  re-runs nothing). Acks from threads other than the event loop's are applied at once.
* Leases (``reservation_lease`` > 0, s): every held message (reserved, running, waiting for
  its ETA) has its ``unacked_index`` score rewritten every third of the lease by a thread of
  the channel, and the lease replaces ``visibility_timeout``, so kombu's own
  ``restore_visible`` sweep returns a dead worker's messages within the lease plus one sweep.

Everything else is kombu's: the message format, rejects and requeues, fanout over pub/sub,
``global_keyprefix``, queue expiry, the restore sweep. The kombu internals this relies on are
named where they are used and declared in :data:`SEAMS` (checked by ``tests/test_seams.py``);
the tested range is pinned in ``pyproject.toml`` (kombu 5.7).

Extra transport options: ``taskyard_namespace`` (key namespace of the wake streams and the
quarantine list), ``reservation_lease``, ``ack_flush_delay``, ``wake_maxlen`` (approximate
length cap of a wake stream), ``binding_cache_ttl`` (s a channel reuses an exchange's binding
table instead of reading it on every publish), ``fetch_batch`` (most messages one fetch pops
when prefetch allows several), ``fetch_budget`` (s of observed delivery time one fetch may
bring: see :meth:`Channel.fetch_want`).
"""

# kombu's transport classes are unannotated; untyped_calls_exclude does not reach calls made
# through super() on their subclasses, so this module lets those calls through.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cached_property
from queue import Empty
from time import monotonic, time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils import json as kombu_json

from taskyard import serialization
from taskyard.broker import delays as _delays
from taskyard.broker.control import jobs as _jobs
from taskyard.broker.lease import Maintenance
from taskyard.broker.lua import (
    ACK_SCRIPT,
    FETCH_SCRIPT,
    PUBLISH_SCRIPT,
    RELEASE_SCRIPT,
    RENEW_SCRIPT,
)
from taskyard.keys import Keys
from taskyard.lua import send as send_words
from taskyard.seams import Seam

# What this module relies on in kombu and redis-py (checked by tests/test_seams.py): the poller
# hooks it overrides, the channel's fetch entry points and helpers, the restore path, QoS
# bookkeeping, the fetch connection.
SEAMS = (
    Seam("kombu.transport.redis.MultiChannelPoller", "_register_BRPOP", params=("channel",)),
    Seam("kombu.transport.redis.MultiChannelPoller", "_pause_brpop", params=("channel", "fileno")),
    Seam("kombu.transport.redis.MultiChannelPoller", "on_readable", params=("fileno",)),
    Seam("kombu.transport.redis.MultiChannelPoller", "on_poll_start"),
    Seam("kombu.transport.redis.MultiChannelPoller", "_client_registered"),
    Seam("kombu.transport.redis.MultiChannelPoller", "_register"),
    Seam("kombu.transport.redis.MultiChannelPoller", "_unregister_from_poll"),
    Seam("kombu.transport.redis.MultiChannelPoller", "_update_brpop_polling"),
    Seam("kombu.transport.redis.MultiChannelPoller", "_paused_brpop", "instance"),
    Seam("kombu.transport.redis.MultiChannelPoller", "_fd_to_chan", "instance"),
    Seam("kombu.transport.redis.MultiChannelPoller", "_chan_to_sock", "instance"),
    Seam("kombu.transport.redis.Channel", "_brpop_start", params=("timeout",)),
    Seam("kombu.transport.redis.Channel", "_brpop_read"),
    Seam("kombu.transport.redis.Channel", "_poll_error", params=("type",)),
    Seam("kombu.transport.redis.Channel", "_in_poll", "attribute"),
    Seam(
        "kombu.transport.redis.Channel",
        "_do_restore_message",
        params=("payload", "exchange", "routing_key", "pipe", "leftmost"),
    ),
    Seam("kombu.transport.redis.Channel", "_q_for_pri", params=("queue", "pri")),
    # The consumed queues change only in basic_consume and basic_cancel, which end in these.
    Seam("kombu.transport.redis.Channel", "active_queues", "attribute"),
    Seam("kombu.transport.redis.Channel", "_update_queue_cycle"),
    Seam("kombu.transport.virtual.Channel", "_reset_cycle"),
    Seam("kombu.transport.redis.Channel", "_queue_cycle", "instance"),
    Seam("kombu.transport.redis.Channel", "_get_message_priority"),
    Seam("kombu.transport.redis.Channel", "_create_client", params=("asynchronous",)),
    Seam("kombu.transport.redis.Channel", "_flush_brpop_reauth"),
    Seam("kombu.transport.redis.Channel", "_pending_reauth_token"),
    Seam("kombu.transport.redis.Channel", "_close_clients"),
    Seam("kombu.transport.redis.Channel", "_on_connection_disconnect", params=("connection",)),
    Seam("kombu.transport.redis.Channel", "_closing", "attribute"),
    Seam("kombu.transport.redis.Channel", "conn_or_acquire", params=("client",)),
    Seam("kombu.transport.redis.Channel", "get_table", params=("exchange",)),
    Seam("kombu.transport.redis.Channel", "_lookup", params=("exchange", "routing_key")),
    Seam("kombu.transport.redis.Channel", "_queue_bind"),
    Seam("kombu.transport.redis.Channel", "_delete", params=("queue",)),
    Seam("kombu.transport.redis.Channel", "_put", params=("queue", "message")),
    Seam(
        "kombu.transport.redis.Channel",
        "_put_fanout",
        params=("exchange", "message", "routing_key"),
    ),
    Seam(
        "kombu.transport.redis.Channel", "_get_publish_topics", params=("exchange", "routing_key")
    ),
    Seam("kombu.transport.redis.Channel", "_expires", "instance"),
    Seam("kombu.transport.redis.Channel", "from_transport_options", "attribute"),
    # The read timeout taskyard sets through broker_transport_options (app.py): kombu's
    # channel takes it as an option and hands it to redis-py's connections.
    Seam("kombu.transport.redis.Channel", "socket_timeout", "attribute"),
    Seam("kombu.transport.redis.Channel", "unacked_key", "attribute", value="unacked"),
    Seam("kombu.transport.redis.Channel", "unacked_index_key", "attribute", value="unacked_index"),
    Seam("kombu.transport.redis.Channel", "sep", "attribute", value="\x06\x16"),
    Seam("kombu.transport.redis", "PRIORITY_STEPS", "attribute", value=[0, 3, 6, 9]),
    Seam("kombu.transport.redis.SentinelChannel", "from_transport_options", "attribute"),
    Seam("kombu.transport.redis.QoS", "append", params=("message", "delivery_tag")),
    # Re-implemented (QoS.restore_by_tag) with kombu's signature, on its helpers below.
    Seam("kombu.transport.redis.QoS", "restore_by_tag", params=("tag", "client", "leftmost")),
    Seam("kombu.transport.redis.QoS", "unacked_key", "attribute"),
    Seam("kombu.transport.redis.QoS", "restore_visible"),
    Seam("kombu.transport.redis.QoS", "restore_unacked"),
    Seam("kombu.transport.redis.QoS", "_remove_from_indices", params=("delivery_tag", "pipe")),
    Seam("kombu.transport.virtual.QoS", "append", params=("message", "delivery_tag")),
    Seam("kombu.transport.virtual.QoS", "ack", params=("delivery_tag",)),
    Seam("kombu.transport.virtual.QoS", "can_consume_max_estimate"),
    Seam("kombu.transport.virtual.QoS", "_delivered", "instance"),
    Seam("kombu.transport.virtual.QoS", "_dirty", "instance"),
    Seam("kombu.transport.virtual.Transport", "_deliver", params=("message", "queue")),
    Seam(
        "kombu.transport.redis.Transport", "register_with_event_loop", params=("connection", "loop")
    ),
    Seam("kombu.asynchronous.hub.Hub", "readers", "instance"),
    # kombu prefixes keys in execute_command only: the scripts and raw commands of this module
    # call redis.Redis's own (taskyard.lua) with full keys (tests/test_lua.py on a real client).
    Seam("kombu.transport.redis.GlobalKeyPrefixMixin", "execute_command"),
    Seam("kombu.transport.redis.GlobalKeyPrefixMixin", "_prefix_args", params=("args",)),
    # redis-py: the fetch connection's socket, its re-auth, and reading a reply sent earlier.
    Seam("redis.connection.AbstractConnection", "_sock", "instance"),
    Seam("redis.connection.AbstractConnection", "re_auth"),
    Seam("redis.connection.AbstractConnection", "set_re_auth_token", params=("token",)),
    Seam("redis.client.Redis", "parse_response", params=("connection", "command_name")),
    # The publish path's own connection per thread (taskyard.lua: Script.fast): checked out of
    # the client's pool, which connects it (a Sentinel connection finds its master there), and
    # given back when dropped.
    Seam("redis.connection.ConnectionPool", "get_connection"),
    Seam("redis.connection.ConnectionPool", "release", params=("connection",)),
    # Script.fast packs its command in one hiredis call when the connection's packer and
    # encoder are redis-py's defaults (tests/test_lua.py compares the bytes with redis-py's).
    Seam("redis.connection.AbstractConnection", "_command_packer", "instance"),
    Seam("redis.connection.AbstractConnection", "encoder", "instance"),
    Seam("redis.connection.AbstractConnection", "send_packed_command", params=("command",)),
    Seam("redis.connection.HiredisRespSerializer", "pack"),
)

logger = logging.getLogger(__name__)

#: Most acks one fetch carries; the rest ride on the next one.
MAX_ACKS_PER_CALL = 5000
#: Times the ack timer leaves pending acks to an imminent fetch before applying them itself:
#: bounds an ack's delay to about this many ack_flush_delay periods.
MAX_ACK_DEFERRALS = 20

_FETCH, _WAKE = "fetch", "wake"
#: kombu.utils.json.dumps builds a JSONEncoder on every call; one encoder with its settings
#: (kombu's encoder class, json's defaults) gives the same text. JSONEncoder.encode keeps no
#: state between calls.
_MESSAGE_ENCODER = kombu_json.JSONEncoder()
#: kombu's own property, which Channel.active_queues caches.
_KOMBU_ACTIVE_QUEUES: Callable[[Any], list[str]] = kombu_redis.Channel.__dict__[
    "active_queues"
].fget


@dataclass(frozen=True, slots=True)
class FetchPlan:
    """Keys of one fetch over a set of queues, in consumption order."""

    keys: tuple[str, ...]
    list_queues: tuple[str, ...]  # the queue of each list key, in order
    wake_keys: tuple[str, ...]  # the queues' wake streams, then flow control's


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, with acks batched by the channel and fetch-recorded deliveries."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Tags the FETCH script already recorded in the unacked HASH and index.
        self._prerecorded: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self._prerecorded:
            self._prerecorded.discard(delivery_tag)
            # virtual.QoS.append: only the in-memory bookkeeping (kombu's Redis QoS.append
            # would write the unacked records a second time).
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        self.channel.queue_ack(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            # kombu's semantics: LPUSHed back (the far end from consumers), in one transaction.
            super().reject(delivery_tag, requeue=True)
            self.channel.release_tags([delivery_tag])
        else:
            self.ack(delivery_tag)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        """kombu's restore of one unacked record, which sets aside a record it cannot read.

        kombu's version decodes the record inside its transaction and lets a decode error
        (a message nested deeper than Python's decoder takes: ``RecursionError``) escape, which
        ends the whole restore sweep at that record, for every worker, for good: every older
        abandoned message would never come back. Here such a record goes to the quarantine
        list, as the fetch script does with an undecodable message, and the sweep goes on.
        """
        channel = self.channel
        undecodable: list[bytes] = []

        def restore_transaction(pipe: Any) -> None:
            raw = pipe.hget(self.unacked_key, tag)
            record = None
            if raw:
                try:
                    record = serialization.loads(raw)
                    message, exchange, routing_key = record
                except Exception:  # RecursionError, ValueError, a record of another shape
                    record = None
                    undecodable.append(raw)
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if record is not None:
                channel._do_restore_message(message, exchange, routing_key, pipe, leftmost)
            elif raw:
                # LPUSH gets kombu's global_keyprefix from a prefixing client, LTRIM does not.
                name = channel._keys.broker_quarantine()
                pipe.lpush(name, raw)
                pipe.execute_command("LTRIM", channel.full_key(name), 0, 9999)

        with channel.conn_or_acquire(client) as conn:
            conn.transaction(restore_transaction, self.unacked_key)
        if undecodable:
            logger.warning(
                "restore sweep: moved unreadable unacked record %s to %s",
                tag,
                channel.full_key(channel._keys.broker_quarantine()),
            )
        # The message is back in its queue (or quarantined): what its reservation held goes.
        try:
            self.channel.release_tags([tag])
        except self.channel.connection_errors:
            # The lock's own lease expiry frees it instead.
            logger.warning("could not release the locks of restored message %s", tag)

    def fetch_due(self) -> bool:
        """Whether a fetch should be sent now: nothing held, half the reservations free, or
        one free for an ack delay since the last fetch was sent.

        Refilling one reservation at a time would cost a fetch round trip per task; waiting for
        half of them brings several messages per fetch while the worker's processes still have
        work at hand. The time bound keeps an urgent message from waiting for a large
        prefetch to half empty behind slow tasks: a freed reservation is fetched for within
        about ``ack_flush_delay``, when the ack timer wakes the loop (and that fetch carries the
        acks), so the prefetch can grow without delaying urgent work.
        """
        pcount = self.prefetch_count
        if not pcount:
            return True
        # _delivered/_dirty: kombu's virtual.QoS bookkeeping, as in its can_consume().
        held = len(self._delivered) - len(self._dirty)
        free = pcount - held
        if held <= 0 or free >= max(1, pcount // 2):
            return True
        if free < 1:
            return False
        channel = self.channel
        return bool(monotonic() - (channel._brpop_sent_at or 0.0) >= channel.ack_flush_delay)

    def held_tags(self) -> list[str]:
        """Tags delivered and not yet acknowledged (safe to call from another thread)."""
        for _ in range(10):
            try:
                # _delivered/_dirty are kombu's virtual.QoS bookkeeping, mutated by the
                # consuming thread; a copy that races a mutation is retried.
                dirty = set(self._dirty)
                return [tag for tag in list(self._delivered) if tag not in dirty]
            except RuntimeError:
                continue
        return []


class Poller(kombu_redis.MultiChannelPoller):
    """kombu's poller, registering each channel's fetch client instead of ``channel.client``.

    kombu keys the BRPOP registration on ``channel.client``; here that is the reused client
    of ordinary commands, and the blocking reads go through ``channel.fetch_client``.
    """

    def _register_BRPOP(self, channel: Channel) -> None:
        client = channel.fetch_client
        if not self._client_registered(channel, client, "BRPOP"):
            channel._in_poll = False
            self._register(channel, client, "BRPOP")
        if not channel._in_poll and channel.qos.fetch_due():
            channel._brpop_start()

    def _pause_brpop(self, channel: Channel, fileno: int) -> None:
        if fileno not in self._paused_brpop:
            connection = channel._in_poll
            self._unregister_from_poll(fileno)
            self._paused_brpop[fileno] = (
                channel,
                channel.fetch_client,
                connection,
                connection._sock,
            )

    def on_readable(self, fileno: int) -> None:
        if fileno in self._paused_brpop:
            return
        chan_type = self._fd_to_chan.get(fileno)
        if chan_type is None:
            return
        chan, kind = chan_type
        if chan.qos.can_consume():
            chan.handlers[kind]()
        elif kind == "BRPOP":
            if chan._in_poll:
                self._pause_brpop(chan, fileno)
            else:
                chan.fetch_client.connection.disconnect()


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with the atomic fetch, a reused client and batched acks."""

    QoS = QoS

    _own_options = (
        "taskyard_namespace",
        "reservation_lease",
        "ack_flush_delay",
        "wake_maxlen",
        "binding_cache_ttl",
        "fetch_batch",
        "fetch_budget",
    )
    # kombu's attribute is typed as a tuple of its own length, hence the ignore.
    from_transport_options = kombu_redis.Channel.from_transport_options + _own_options  # type: ignore[assignment]
    # kombu's class defaults (False, None) hold a connection and a monotonic time here.
    _in_poll: Any
    _brpop_sent_at: Any
    visibility_timeout: float  # type: ignore[assignment]  # kombu's default is an int

    taskyard_namespace = "taskyard"
    reservation_lease = 0.0
    ack_flush_delay = 0.005
    wake_maxlen = 100
    binding_cache_ttl = 5.0
    fetch_batch = 16
    fetch_budget = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pending_acks: deque[str] = deque()
        self._inflight_acks: list[str] = []
        self._ack_timer_armed = False
        self._ack_timer_deferrals = 0
        self._fetch_state: str | None = None
        self._fetch_plan: FetchPlan | None = None
        self._plans: dict[tuple[str, ...], FetchPlan] = {}
        self._tables: dict[str, tuple[float, list[Any]]] = {}
        #: (queue, priority) -> full keys of its list and wake stream, for publishing.
        self._publish_keys: dict[tuple[str, int], tuple[str, str]] = {}
        self._empty_refresh: dict[str, float] = {}
        self._no_ack_queues: set[str] = set()
        #: Observed delivery time per message (s), for fetch_budget; None until measured.
        self._per_message_s: float | None = None
        self._maintenance: Maintenance | None = None
        #: Callables the channel's maintenance thread runs about every 0.25 s while the
        #: channel consumes (broker-side delay movers register here).
        self.on_tick: list[Callable[[], None]] = []
        #: (exchange, routing key) -> clients the last fanout publish to it reached (PUBLISH's
        #: reply): how task events learn whether anyone listens (monitoring/events.py).
        self.fanout_reach: dict[tuple[str, str], int] = {}
        self._active_cache: list[str] | None = None
        super().__init__(*args, **kwargs)
        if self.reservation_lease:
            # kombu's restore_visible sweep compares delivery times with visibility_timeout;
            # with leases the score is the last renewal, so the lease is the timeout.
            self.visibility_timeout = float(self.reservation_lease)
        self._keys = Keys(self.taskyard_namespace)
        #: ARGV[1] of the fetch and ack scripts: where their fragments name their keys.
        self._script_prefix = self.full_key(self._keys.script_prefix())

    @property
    def active_queues(self) -> list[str]:
        """kombu's, computed once per change of the consumed queues: the poller asks on every
        event-loop turn, and kombu builds the list anew each time (measured: a prefork worker's
        main loop turns about 2.4 times per task, and asks for each of its 3 channels)."""
        cached = self._active_cache
        if cached is None:
            cached = self._active_cache = _KOMBU_ACTIVE_QUEUES(self)
        return cached

    def _reset_cycle(self) -> None:
        # Called by kombu's basic_consume and basic_cancel after the consumed queues changed.
        self._active_cache = None
        super()._reset_cycle()

    def _update_queue_cycle(self) -> None:
        # And this after the fanout queues changed too.
        self._active_cache = None
        super()._update_queue_cycle()

    # --- clients ----------------------------------------------------------------------------
    @cached_property
    def client(self) -> redis.Redis:
        """The channel's reused client for every non-blocking command (thread-safe pool)."""
        client: redis.Redis = self._create_client()
        return client

    @cached_property
    def fetch_client(self) -> redis.Redis:
        """Client pinned to the connection the event loop polls for fetch replies."""
        client: redis.Redis = self._create_client(asynchronous=True)
        return client

    @contextmanager
    def conn_or_acquire(self, client: redis.Redis | None = None) -> Iterator[redis.Redis]:
        # kombu calls this for every command of its own (restore, purge, size, acks).
        yield client or self.client

    @property
    def keyprefix(self) -> str:
        """kombu's global key prefix; the scripts and raw commands get full key names."""
        return str(self.global_keyprefix or "")

    def full_key(self, name: str) -> str:
        return self.keyprefix + name

    def wake_key(self, queue: str) -> str:
        """Full name of ``queue``'s wake stream."""
        return self.full_key(self._keys.wake_stream(queue))

    # --- consuming ----------------------------------------------------------------------------
    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        result = super().basic_consume(queue, no_ack, *args, **kwargs)
        if self.active_queues and self._maintenance is None:
            _jobs.announce_lease(self)
            self._maintenance = Maintenance(self, float(self.reservation_lease))
            self._maintenance.start()
        return result

    def _plan(self, queues: tuple[str, ...]) -> FetchPlan:
        plan = self._plans.get(queues)
        if plan is None:
            lists = [
                (queue, self._q_for_pri(queue, pri))
                for queue in queues
                for pri in self.priority_steps
            ]
            wake = (
                *(self.wake_key(queue) for queue in queues),
                self.full_key(self._keys.flow_wake()),
            )
            keys = (
                self.full_key(self.unacked_key),
                self.full_key(self.unacked_index_key),
                self.full_key(self._keys.broker_quarantine()),
                *(self.full_key(name) for _, name in lists),
                *wake,
            )
            plan = FetchPlan(keys, tuple(queue for queue, _ in lists), wake)
            self._plans[queues] = plan
        return plan

    @cached_property
    def lease_ms(self) -> int:
        """How long a reservation (and a unique lock held with it) lasts unrenewed (ms)."""
        return max(1000, int(float(self.reservation_lease or self.visibility_timeout) * 1000))

    def _fetch_args(self, plan: FetchPlan, want: int, record: bool, acks: list[str]) -> list[Any]:
        return [
            self._script_prefix,
            repr(time()),
            len(plan.list_queues),
            want,
            "1" if record else "0",
            len(acks),
            *acks,
        ]

    def release_tags(self, tags: list[str]) -> None:
        """Run the fetch's release hooks for tags going back to their queue (a requeue or a
        restored reservation): what admission took for them (a concurrency slot) is free now."""
        if tags:
            RELEASE_SCRIPT(self.client, (), (self._script_prefix, *tags))

    def _brpop_start(self, timeout: float | None = None) -> None:
        # Called by kombu's poller (on_poll_start -> _register_BRPOP) whenever the channel
        # may consume and has no read outstanding: sends one FETCH without waiting for it.
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        plan = self._plan(tuple(queues))
        want = self.fetch_want()
        record = any(queue not in self._no_ack_queues for queue in queues)
        acks = self._take_acks()
        if acks:
            self._ack_timer_deferrals = 0
        connection: Any = self.fetch_client.connection
        self._inflight_acks = acks
        self._fetch_plan = plan
        self._fetch_state = _FETCH
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        try:
            send_words(
                connection,
                FETCH_SCRIPT.command(plan.keys, self._fetch_args(plan, want, record, acks)),
            )
        except BaseException:
            self._end_read(failed=True)
            raise

    def _brpop_read(self, **options: Any) -> bool:
        client = self.fetch_client
        connection: Any = client.connection
        state = self._fetch_state
        try:
            reply = client.parse_response(
                connection, "EVALSHA" if state == _FETCH else "XREAD", **options
            )
        except redis.exceptions.NoScriptError:
            # The server lost its scripts (restart, SCRIPT FLUSH): load and fetch again.
            self._end_read(failed=True)
            FETCH_SCRIPT.load(self.client)
            raise Empty() from None
        except self.connection_errors:
            self._end_read(failed=True)
            connection.disconnect()
            raise
        except BaseException:
            self._end_read(failed=True)
            raise
        if state != _FETCH:
            self._end_read()
            raise Empty()
        self._inflight_acks = []
        kind = reply[0]
        if kind == 0:
            self._wait_for_wake(connection, reply[2:], int(reply[1]))
            raise Empty()
        plan = self._fetch_plan
        self._end_read()
        if kind == 2:
            logger.warning(
                "moved %d undecodable message(s) to %s",
                reply[1],
                self.full_key(self._keys.broker_quarantine()),
            )
            raise Empty()
        assert plan is not None
        started = monotonic()
        self._deliver_fetched(plan, reply[1:])
        self._observe_delivery(monotonic() - started, len(reply) // 2)
        return True

    def fetch_want(self) -> int:
        """How many messages the next fetch asks for.

        At most ``fetch_batch`` and what the prefetch leaves free; and, with a ``fetch_budget``,
        no more than fit in that budget at the delivery time per message observed so far. Where
        a consumer runs each task as it is delivered (a solo pool: the fast profile), delivery
        time is run time: short tasks then come a full batch per round trip, while an urgent
        message waits behind no more than about the budget of reserved work. Where delivering
        only hands the task on (a prefork pool), it is short and the prefetch decides.
        """
        estimate = self.qos.can_consume_max_estimate()
        want = self.fetch_batch if estimate is None else max(1, min(estimate, self.fetch_batch))
        budget = self.fetch_budget
        if budget > 0:
            # Until a delivery was timed: a quarter of the batch.
            per_message = self._per_message_s or budget * 4 / max(1, self.fetch_batch)
            want = max(1, min(want, int(budget / per_message)))
        return want

    def _observe_delivery(self, elapsed_s: float, count: int) -> None:
        """Fold one fetch's delivery time into the per-message estimate: slower at once (an
        urgent message must not wait behind a batch sized for shorter tasks), faster by a
        quarter of the difference per fetch."""
        if count <= 0:
            return
        per_message = max(elapsed_s / count, 1e-6)
        known = self._per_message_s
        if known is None or per_message >= known:
            self._per_message_s = per_message
        else:
            self._per_message_s = known + (per_message - known) * 0.25

    def _deliver_fetched(self, plan: FetchPlan, flat: list[Any]) -> None:
        pairs = []
        tags = []
        for i in range(0, len(flat), 2):
            raw = flat[i + 1]
            try:
                payload = serialization.loads(raw)
                tag = payload["properties"]["delivery_tag"]
            except Exception:
                # The fetch script keeps aside what it cannot decode or nests too deep, so this
                # is a decoder of another mind than Redis' (never seen). It must not raise out
                # of the event loop (that stops the worker): skip it. Its record, never renewed,
                # reaches the restore sweep, which sets it aside (QoS.restore_by_tag).
                logger.exception("fetched message unreadable, left to the restore sweep")
                continue
            pairs.append((plan.list_queues[int(flat[i]) - 1], raw))
            tags.append((payload, tag))
        if not pairs:
            raise Empty()
        prerecorded = self.qos._prerecorded
        for index, ((queue, _), (payload, tag)) in enumerate(zip(pairs, tags, strict=True)):
            prerecorded.add(tag)
            try:
                self._queue_cycle.rotate(queue)
                self.connection._deliver(payload, queue)
            except BaseException:
                # The rest are recorded but not delivered: back to the consuming end of their lists.
                prerecorded.discard(tag)
                later = [held for _, held in tags[index + 1 :]]
                for held in later:
                    self.qos.restore_by_tag(held)
                self.release_tags(later)
                raise
            if tag in prerecorded:
                # Delivered to a no-ack consumer (no QoS.append): drop the record.
                prerecorded.discard(tag)
                self.queue_ack(tag)

    def _wait_for_wake(self, connection: Any, ids: list[Any], retry_ms: int = 0) -> None:
        # Every list was empty: block on the wake streams from the ids read in that same
        # atomic call. The read is sent on the fetch connection, still registered with the
        # poller, so the event loop is woken by a publish or by the timeout.
        plan = self._fetch_plan
        assert plan is not None
        if self._pending_acks:
            # Idle: nothing to carry them on. If Redis refuses now, the fetch after the wake
            # carries them.
            try:
                self._flush_acks()
            except self.connection_errors:
                logger.warning(
                    "could not apply acknowledgements; the next fetch carries them", exc_info=True
                )
        timeout_ms = max(1, int((self.brpop_timeout or 1) * 1000))
        if retry_ms:
            # A message held by a rate limit may run then: fetch again no later.
            timeout_ms = min(timeout_ms, retry_ms)
        self._fetch_state = _WAKE
        self._brpop_sent_at = monotonic()
        try:
            connection.send_command("XREAD", "BLOCK", timeout_ms, "STREAMS", *plan.wake_keys, *ids)
        except BaseException:
            self._end_read()
            raise

    def _end_read(self, failed: bool = False) -> None:
        if failed and self._inflight_acks:
            # Unknown whether the script ran: apply them again (acks are idempotent).
            self._pending_acks.extendleft(reversed(self._inflight_acks))
        self._inflight_acks = []
        self._fetch_state = None
        self._in_poll = None
        self._flush_brpop_reauth()

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        plan = self._plan((queue,))
        acks = self._take_acks()
        try:
            reply = FETCH_SCRIPT(
                self.client, plan.keys, self._fetch_args(plan, 1, not no_ack, acks)
            )
        except BaseException:
            self._pending_acks.extendleft(reversed(acks))
            raise
        if reply[0] != 1:
            return None
        message = self.Message(serialization.loads(reply[2]), channel=self)
        if not no_ack:
            self.qos._prerecorded.add(message.delivery_tag)
            self.qos.append(message, message.delivery_tag)
        return message

    def _poll_error(self, type: str, **options: Any) -> Any:
        if type == "LISTEN":
            return super()._poll_error(type, **options)
        return self._brpop_read(**options)

    def _on_connection_disconnect(self, connection: Any) -> None:
        if self._in_poll is connection and self._inflight_acks:
            self._pending_acks.extendleft(reversed(self._inflight_acks))
            self._inflight_acks = []
            self._fetch_state = None
        super()._on_connection_disconnect(connection)

    def _flush_brpop_reauth(self) -> None:
        # kombu's version reads the pending re-auth token of channel.client's connection;
        # here the long-lived connection is the fetch client's.
        if self._in_poll:
            return
        client = self.__dict__.get("fetch_client")
        connection: Any = getattr(client, "connection", None)
        if self._pending_reauth_token(connection) is None:
            return
        if getattr(connection, "_sock", None) is None:
            return
        try:
            connection.re_auth()
        except (*self.connection_errors, self.ResponseError):
            logger.warning(
                "Redis re-auth failed on the fetch connection; reconnecting", exc_info=True
            )
            with suppress(AttributeError):
                connection.set_re_auth_token(None)
            with suppress(*self.connection_errors):
                connection.disconnect()

    # --- acks -------------------------------------------------------------------------------
    def queue_ack(self, tag: str) -> None:
        """Remove ``tag``'s unacked records soon: on the next fetch, else within the delay."""
        self._pending_acks.append(tag)
        transport = self.connection
        loop = getattr(transport, "_taskyard_loop", None)
        if loop is None or threading.get_ident() != transport._taskyard_loop_thread:
            self._flush_acks()
            return
        if not self._ack_timer_armed:
            self._ack_timer_armed = True
            loop.call_later(self.ack_flush_delay, self._on_ack_timer)

    def _on_ack_timer(self) -> None:
        self._ack_timer_armed = False
        if not self._pending_acks:
            return
        loop = getattr(self.connection, "_taskyard_loop", None)
        fetching = self._fetch_state == _FETCH or (
            not self._in_poll and self.active_queues and self.qos.fetch_due()
        )
        if fetching and loop is not None and self._ack_timer_deferrals < MAX_ACK_DEFERRALS:
            # A fetch is in flight, or the poller sends one on this loop turn (timers run
            # first): it carries the acks. Looked at again after another delay.
            self._ack_timer_deferrals += 1
            self._ack_timer_armed = True
            loop.call_later(self.ack_flush_delay, self._on_ack_timer)
            return
        self._ack_timer_deferrals = 0
        try:
            self._flush_acks()
        except self.connection_errors:
            logger.warning("could not apply acknowledgements; retrying", exc_info=True)
            loop = getattr(self.connection, "_taskyard_loop", None)
            if loop is not None and not self._ack_timer_armed and not self.closed:
                self._ack_timer_armed = True
                loop.call_later(max(self.ack_flush_delay, 0.5), self._on_ack_timer)

    def _take_acks(self) -> list[str]:
        pending = self._pending_acks
        taken: list[str] = []
        with suppress(IndexError):
            for _ in range(min(len(pending), MAX_ACKS_PER_CALL)):
                taken.append(pending.popleft())
        return taken

    def _flush_acks(self) -> None:
        while self._pending_acks:
            tags = self._take_acks()
            try:
                ACK_SCRIPT(
                    self.client,
                    [self.full_key(self.unacked_key), self.full_key(self.unacked_index_key)],
                    [self._script_prefix, *tags],
                )
            except BaseException:
                self._pending_acks.extendleft(reversed(tags))
                raise

    def renew_leases(self) -> int:
        """Rewrite the delivery time of every message this channel holds; returns how many."""
        tags = self.qos.held_tags()
        if not tags:
            return 0
        now = repr(time())
        key = self.full_key(self.unacked_index_key)
        for start in range(0, len(tags), 1000):
            # The reservations' scores and the concurrency slots they hold (flow control).
            RENEW_SCRIPT(
                self.client, (key,), (self._script_prefix, now, *tags[start : start + 1000])
            )
        return len(tags)

    # --- publishing -------------------------------------------------------------------------
    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        publish_batch = kwargs.get("_publish_batch")
        if publish_batch is not None or queue in self._expires:
            # kombu's own path (batched publish, queue TTLs), through the reused client.
            super()._put(queue, message, **kwargs)
            if publish_batch is not None:
                publish_batch.add(
                    "xadd", self.wake_key(queue), {"w": 1}, "*", self.wake_maxlen, True
                )
            else:
                self._wake(queue)
            return
        headers = message.get("headers") or {}
        if headers.get(_jobs.HEADER_UNIQUE):
            # Unique, throttled or debounced: lock and push in one script (raises
            # TaskDeduplicated when another message holds the key).
            _jobs.publish_unique(self, queue, message)
            return
        if headers.get("eta"):
            # Broker-side delays: a message due later waits in Redis, not in a worker.
            # kombu's prefixing pipeline (when global_keyprefix is set): delays.py names keys
            # without the prefix, as kombu's own commands do.
            pipe = self.client.pipeline(transaction=False)
            if _delays.maybe_delay(pipe, self, queue, message):
                pipe.execute()
                return
        keys = self.publish_keys(queue, message)
        # On this thread's own connection: borrowing a pooled one costs more than the script
        # (measured in alternating rounds: 171 against 202 µs of CPU per .delay()). A broken
        # connection falls back to the ordinary call, and a refused one to kombu's retrying path
        # (publish.py).
        args = (_MESSAGE_ENCODER.encode(message), self.wake_maxlen)
        PUBLISH_SCRIPT.fast(self.client, keys, args)

    def _put_fanout(
        self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any
    ) -> None:
        # kombu's, keeping PUBLISH's reply: the number of subscribers the message reached.
        if kwargs.get("_publish_batch") is not None:
            super()._put_fanout(exchange, message, routing_key, **kwargs)
            return
        payload = kombu_json.dumps(message)
        reached = 0
        for topic in self._get_publish_topics(exchange, routing_key):
            reached += int(self.client.publish(topic, payload))
        if len(self.fanout_reach) > 256:
            self.fanout_reach.clear()
        self.fanout_reach[(exchange, routing_key)] = reached

    def publish_keys(self, queue: str, message: dict[str, Any]) -> tuple[str, str]:
        """Full names of the list ``message`` goes onto and of its queue's wake stream."""
        priority = self._get_message_priority(message, reverse=False)
        keys = self._publish_keys.get((queue, priority))
        if keys is None:
            keys = (self.full_key(self._q_for_pri(queue, priority)), self.wake_key(queue))
            if len(self._publish_keys) > 1024:
                self._publish_keys.clear()
            self._publish_keys[(queue, priority)] = keys
        return keys

    @staticmethod
    def encode_message(message: dict[str, Any]) -> str:
        """A message's text as this transport stores it."""
        return _MESSAGE_ENCODER.encode(message)

    def _wake(self, queue: str, pipe: Any = None) -> None:
        target = pipe if pipe is not None else self.client
        # Called unbound on redis.Redis so kombu's prefixing client leaves the full key alone.
        command = ("XADD", self.wake_key(queue), "MAXLEN", "~", self.wake_maxlen, "*", "w", 1)
        if pipe is not None:
            target.execute_command(*command)
        else:
            redis.Redis.execute_command(target, *command)

    def _do_restore_message(
        self, payload: Any, exchange: str, routing_key: str, pipe: Any, leftmost: bool = False
    ) -> None:
        # kombu pushes the message back inside its restore transaction; the wake entry goes
        # into the same transaction so idle workers see it at once.
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        for queue in self._lookup(exchange, routing_key):
            self._wake(queue, pipe)

    # --- bindings ---------------------------------------------------------------------------
    def get_table(self, exchange: str) -> list[Any]:
        # kombu reads the binding table (SMEMBERS) on every publish; the table changes only
        # when queues are bound or deleted, so it is reused for binding_cache_ttl seconds.
        now = monotonic()
        cached = self._tables.get(exchange)
        if cached is not None and cached[0] > now:
            return cached[1]
        table: list[Any] = super().get_table(exchange)
        if table and self.binding_cache_ttl > 0:
            self._tables[exchange] = (now + self.binding_cache_ttl, table)
        return table

    def _lookup(self, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        queues: list[str] = super()._lookup(exchange, routing_key, default)
        if not queues and exchange in self._tables:
            # Maybe a binding made elsewhere after the table was cached: read it again, at most
            # once a second per exchange, since some routing keys match no queue by design
            # (monitoring events nobody listens to) and would otherwise defeat the cache.
            now = monotonic()
            if now - self._empty_refresh.get(exchange, float("-inf")) >= 1.0:
                self._empty_refresh[exchange] = now
                self._tables.pop(exchange, None)
                queues = super()._lookup(exchange, routing_key, default)
        return queues

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        self._tables.pop(exchange, None)
        super()._queue_bind(exchange, routing_key, pattern, queue)

    def _delete(self, queue: str, exchange: str, *args: Any, **kwargs: Any) -> None:
        self._tables.pop(exchange, None)
        super()._delete(queue, exchange, *args, **kwargs)

    # --- closing ----------------------------------------------------------------------------
    def close(self) -> None:
        if not self.closed:
            self._closing = True
            if self._maintenance is not None:
                self._maintenance.stop()
                self._maintenance = None
            self._abandon_read()
            try:
                self._flush_acks()
            except self.connection_errors:
                logger.warning(
                    "could not apply %d acknowledgement(s) at close; those "
                    "messages run again after the lease",
                    len(self._pending_acks),
                    exc_info=True,
                )
        super().close()

    def _abandon_read(self) -> None:
        """Settle an outstanding read before closing (kombu would deliver its message)."""
        if not self._in_poll:
            return
        connection: Any = self.fetch_client.connection
        if self._fetch_state != _FETCH:
            self._end_read()
            with suppress(*self.connection_errors):
                connection.disconnect()
            return
        try:
            reply = self.fetch_client.parse_response(connection, "EVALSHA")
        except Exception:
            self._end_read(failed=True)
            with suppress(*self.connection_errors):
                connection.disconnect()
            return
        self._inflight_acks = []
        self._end_read()
        if reply and reply[0] == 1:
            tags = [serialization.loads(raw)["properties"]["delivery_tag"] for raw in reply[2::2]]
            for tag in tags:
                self.qos.restore_by_tag(tag)
            with suppress(*self.connection_errors):
                self.release_tags(tags)

    def _close_clients(self) -> None:
        super()._close_clients()
        for attr in ("fetch_client", "client"):
            client = self.__dict__.get(attr)
            if client is None:
                continue
            connection, client.connection = client.connection, None
            if connection is not None:
                with suppress(Exception):
                    connection.disconnect()
            with suppress(Exception):
                client.connection_pool.disconnect()


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same channel on a Sentinel-managed master (``sentinel://`` URLs)."""

    from_transport_options = (
        kombu_redis.SentinelChannel.from_transport_options  # type: ignore[assignment]
        + Channel._own_options
    )


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with taskyard's channel (``broker_transport`` names it)."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle: Any = Poller()
        self._taskyard_loop: Any = None
        self._taskyard_loop_thread: int | None = None
        self._taskyard_tick: Callable[[], None] | None = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        before = set(loop.on_tick)
        super().register_with_event_loop(connection, loop)
        # kombu adds one tick handler (its on_poll_start closure), which registers every
        # socket with the poller again on every loop turn: two syscalls per socket per turn.
        # It is replaced by one that registers a socket only when it is new to the loop.
        for handler in set(loop.on_tick) - before:
            loop.on_tick.discard(handler)
        if self._taskyard_tick is not None:
            loop.on_tick.discard(self._taskyard_tick)
        self._taskyard_tick = self._poll_start_handler(loop)
        loop.on_tick.add(self._taskyard_tick)
        # Acks made on the loop's thread wait for the next fetch, with a loop timer behind.
        self._taskyard_loop = loop
        self._taskyard_loop_thread = threading.get_ident()

    def _poll_start_handler(self, loop: Any) -> Callable[[], None]:
        cycle = self.cycle
        readers = loop.readers  # kombu's Hub: fd -> (callback, args) of registered readers
        on_readable = self.on_readable
        #: The socket object each fd was last registered for: a reconnect may reuse an fd
        #: number for a new socket, which the poller no longer watches (a closed socket
        #: leaves epoll by itself), so identity, not the number, decides.
        registered: dict[int, Any] = {}

        def on_poll_start() -> None:
            cycle.on_poll_start()
            paused = cycle._paused_brpop
            # Nothing below changes the poller's tables, so they are read in place.
            for sock in cycle._chan_to_sock.values():
                fd = sock.fileno()
                if fd < 0 or fd in paused:
                    continue
                if registered.get(fd) is not sock or fd not in readers:
                    loop.add_reader(fd, on_readable, fd)
                    registered[fd] = sock

        return on_poll_start


class SentinelTransport(Transport):
    """Sentinel variant (``sentinel://host:26379;sentinel://...`` with ``master_name``)."""

    default_port = 26379  # type: ignore[assignment]  # kombu's class default is None
    Channel = SentinelChannel
