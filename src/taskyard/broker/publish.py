"""``.delay()`` in one script call: the task message built and published without kombu's producer.

Celery's send path (``Task.apply_async`` -> ``app.send_task`` -> ``amqp.as_task_v2`` ->
``send_task_message`` -> kombu ``Producer.publish`` -> ``Channel.basic_publish`` -> ``_put``)
acquires a producer from the pool, binds a copy of the queue to check its declaration, and merges
options at four levels, on every call: measured, most of a publish's CPU. For the common call
(a task of a taskyard app with no per-call options but ``task_id`` and ``level``, on taskyard's
Redis transport) :class:`Publisher` builds the same protocol-2 message itself and hands it to the
channel's ``_put`` (one ``EVALSHA``) on a connection each thread keeps: threads never share
one, so a thread whose connection breaks drops only its own, and many threads sending at once
never run out of the channel's pooled connections.

What is sent does not change: the same headers, properties and body; ``before_task_publish``
(whose receivers may still edit the headers) and ``after_task_publish`` with the same arguments;
the result backend's ``on_task_call``; ``root_id``/``parent_id`` and the parent's trail inside a
worker; the queue the app's router picks; the ``AsyncResult`` returned. Every other call takes
Celery's own path (:meth:`Publisher.send` returns None before doing anything): per-call options
(countdown, eta, expires, priority, headers, ...), links, a producer or connection of the caller,
always-eager mode, Celery's own task-sent events, routes other than taskyard's router, a task
with a queue, exchange, expiry or delivery options of its own, a result backend other than Redis,
a broker other than taskyard's Redis transport. A publish refused on a connection error, or whose
``before_task_publish`` receivers added properties or declarations, goes through kombu's
``Producer.publish`` with the app's retry policy, as ``send_task_message`` would publish it.

Celery and kombu internals relied on (declared in ``SEAMS``, checked by ``tests/test_seams.py``;
the message layout by ``tests/broker/test_publish.py``): the protocol-2
layout of ``AMQP.as_task_v2`` and the arguments ``send_task_message`` gives the two signals;
``Task._get_exec_options`` (cached per task; its identity tells that the task changed);
``app.amqp.router`` (replaced when ``task_routes`` is updated); ``celery.app.amqp.
_callback_publish_retry`` (a worker's callback publish, retried by Celery its own way); the
virtual channel's ``encode_body``, ``body_encoding`` and ``_next_delivery_tag``, and the message
dict of ``prepare_message`` + ``_inplace_augment_message``.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic
from typing import Any
from uuid import uuid4

from celery import Task
from celery._state import get_current_worker_task
from celery.app import amqp as celery_amqp
from celery.backends.base import BaseBackend
from celery.backends.redis import RedisBackend
from celery.signals import after_task_publish, before_task_publish, task_sent
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from kombu.common import maybe_declare
from kombu.entity import Queue, maybe_delivery_mode
from kombu.exceptions import ChannelError
from kombu.serialization import registry
from kombu.utils.uuid import uuid

from taskyard.broker.transport import Channel
from taskyard.runtime import sending_app
from taskyard.seams import Seam

# Celery and kombu internals this module relies on (checked by tests/test_seams.py; the message
# layout itself by tests/broker/test_publish.py).
SEAMS = (
    Seam("celery._state", "get_current_worker_task"),
    Seam("celery.app.amqp", "_callback_publish_retry", "attribute"),
    Seam("celery.app.amqp.AMQP", "as_task_v2"),
    Seam("celery.app.amqp.AMQP", "router", "attribute"),
    Seam("celery.app.task.Task", "_get_exec_options"),
    Seam("kombu.transport.virtual.Channel", "encode_body", params=("body", "encoding")),
    Seam("kombu.transport.virtual.Channel", "body_encoding", "attribute"),
    Seam("kombu.transport.virtual.Channel", "_next_delivery_tag"),
    Seam("kombu.transport.virtual.Channel", "prepare_message"),
    Seam(
        "kombu.transport.virtual.Channel",
        "_inplace_augment_message",
        params=("message", "exchange", "routing_key"),
    ),
    Seam("kombu.connection.Connection", "_reraise_as_library_errors"),
    # setting(): the settings view's maps (changes first, then the defaults) and what would
    # make a plain read of them differ from its lookup: a key transform, and the prefix and key
    # aliases that _to_keys reads (set in __init__ through __dict__.update, so the lookup is
    # compared with Celery's in tests/broker/test_publish.py, prefixed settings included).
    Seam("celery.utils.collections.ChainMap", "maps", "attribute"),
    Seam("celery.utils.collections.ChainMap", "key_t", "attribute"),
    Seam("celery.utils.collections.ConfigurationView", "_to_keys", params=("key",)),
)

# kombu's virtual channel methods are unannotated.
# mypy: disable-error-code="no-untyped-call"

logger = logging.getLogger(__name__)

#: After the publisher's own connection could not be made, calls take Celery's path (with its
#: retries and errors) for this long (s) before the publisher tries to connect again.
RECONNECT_PAUSE_S = 1.0
#: Properties ``send_task_message`` passes to ``before_task_publish`` for a call without options.
_PLAIN_PROPERTIES = frozenset({"correlation_id", "reply_to", "priority"})


_UNSET = object()


def setting(conf: Any, key: str) -> Any:
    """``conf[key]`` for Celery's settings: the same maps read with ``get`` instead of a caught
    ``KeyError`` per map that lacks the key (about 1.7 µs a lookup, two per ``.delay()``), when
    the view has no prefix, key aliases or key transform; otherwise Celery's own lookup."""
    if conf.prefix or conf._keys or conf.key_t is not None:
        return conf[key]
    for mapping in conf.maps:
        value = mapping.get(key, _UNSET)
        if value is not _UNSET:
            return value
    return conf[key]


class _DeliveryTags:
    """Delivery tags in kombu's shape (a UUID's text) without a random read per message: a
    random version-4 UUID per process whose last 12 hex digits count up. kombu's own tag is
    ``uuid4()``, an ``os.urandom`` system call and about 2 µs of a ~100 µs ``.delay()``; a tag
    only has to be unique among the messages held (the key of the ``unacked`` hash), and a
    process's random 74 bits keep it so. A forked child draws its own."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = str(uuid4())[:24]
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFFFFFF:012x}"


#: The next delivery tag of a message this process publishes.
next_delivery_tag = _DeliveryTags()
#: Execution options (``Task._get_exec_options``) that must be unset on a fast-path task: each
#: changes the message or its destination in ways only Celery's path handles.
_OWN_OPTIONS = (
    "queue",
    "routing_key",
    "exchange",
    "expires",
    "delivery_mode",
    "compression",
    "immediate",
    "mandatory",
)


@dataclass(frozen=True, slots=True)
class _Template:
    """What every fast publish of one task shares."""

    check: Callable[..., Any] | None  # the argument check of a typed task
    timelimit: tuple[Any, Any]
    priority: int | None
    serializer: str
    repr_maxlevels: int
    retry: bool
    retry_policy: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Destination:
    """A queue of the app as ``send_task_message`` resolves it for the default exchange."""

    queue: Queue
    delivery_mode: Any  # as given to Producer.publish
    delivery_mode_value: int  # as it appears in the message properties


class _Link:
    """The publisher's connection of one thread, and its queues as resolved and declared."""

    __slots__ = (
        "__weakref__",
        "channel",
        "channel_errors",
        "connection",
        "connection_errors",
        "declared",
        "destinations",
        "generation",
        "pid",
    )

    def __init__(self, connection: Any, channel: Channel, generation: int) -> None:
        self.connection = connection
        self.channel = channel
        self.connection_errors: tuple[type[BaseException], ...] = connection.connection_errors
        self.channel_errors: tuple[type[BaseException], ...] = connection.channel_errors
        self.declared: set[str] = set()
        self.destinations: dict[str, _Destination | None] = {}
        self.generation = generation
        self.pid = os.getpid()


@dataclass(frozen=True, slots=True)
class _Verdict:
    """Whether a task can be sent here, decided for one state of the task and the router."""

    task: Any
    exec_options: dict[str, Any]  # the task's cached exec options when decided
    router: Any  # app.amqp.router when decided
    template: _Template | None  # None: Celery's path


class Publisher:
    """Fast ``.delay()`` of one taskyard app's tasks on taskyard's Redis transport."""

    def __init__(self, app: Any, router: Any) -> None:
        self.app = app
        #: The taskyard router (``task_routes``); the fast path runs only while it is the one.
        self.router = router
        self._verdicts: dict[str, _Verdict] = {}
        #: Each thread's link (``.link``); every open one, so that close() reaches them all.
        self._local = threading.local()
        self._links: weakref.WeakSet[_Link] = weakref.WeakSet()
        #: Raised by close(): a thread's link of an earlier generation is closed, not used.
        self._generation = 0
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._origin = (0, "")
        #: False once the app's broker turned out not to be taskyard's Redis transport.
        self.enabled = True

    # --- the fast path ------------------------------------------------------------------------
    def send(
        self,
        task: Any,
        args: Any,
        kwargs: Any,
        task_id: str | None,
        queue: str | None,
        extra_headers: dict[str, Any] | None = None,
    ) -> Any:
        """Send ``task`` like ``task.apply_async(args, kwargs, task_id=...)``; None: not here.

        ``queue`` is the per-call level's queue; ``extra_headers`` are taskyard's own message
        headers (job control's ``taskyard_unique``). None is returned before anything is done, so
        the caller takes Celery's path for the same call.

        Raises:
            TypeError: the arguments do not fit the task's signature, or are not a list/tuple
                and a mapping (as Celery raises).
            kombu.exceptions.EncodeError: an argument cannot be serialized (nothing was sent).
            kombu.exceptions.OperationalError: the broker stayed unreachable through the
                retries of kombu's path.
        """
        app = self.app
        conf = app.conf
        if (
            not self.enabled
            or setting(conf, "task_always_eager")
            or setting(conf, "task_send_sent_event")
            or task_sent.receivers
            or celery_amqp._callback_publish_retry.get()
        ):
            return None
        template = self.template(task)
        if template is None:
            return None
        args = args or ()
        kwargs = kwargs or {}
        if template.check is not None:
            template.check(*args, **kwargs)
        if not isinstance(args, list | tuple):
            raise TypeError("task args must be a list or tuple")
        if not isinstance(kwargs, dict):
            # Celery accepts any Mapping; those other than dict take Celery's path.
            return None

        parent = get_current_worker_task()
        if parent is not None and conf.task_inherit_parent_priority and template.priority is None:
            return None
        if queue is None:
            route = self.router(task.name, args, kwargs, {}, task=task)
            queue = route["queue"]
            if len(route) != 2 or route.get("routing_key") != queue:
                return None
        link = self._connected()
        if link is None:
            return None
        destination = self._destination(link, queue)
        if destination is None:
            return None
        ignore_result = task.ignore_result
        on_task_call = None
        if not ignore_result:
            backend = app.backend
            hook = type(backend).on_task_call
            if hook is RedisBackend.on_task_call:
                on_task_call = backend.on_task_call
            elif hook is not BaseBackend.on_task_call:
                return None

        # From here on the task is being sent: no more falling back.
        task_id = task_id or uuid()
        if parent is not None:
            request = parent.request
            root_id = request.root_id or request.id or task_id
            parent_id = request.id
        else:
            root_id, parent_id = task_id, None
        name = task.name
        headers: dict[str, Any] = {
            "lang": "py",
            "task": name,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": list(template.timelimit),
            "root_id": root_id,
            "parent_id": parent_id,
            "argsrepr": saferepr(args, 1024, maxlevels=template.repr_maxlevels) if args else "()",
            "kwargsrepr": (
                saferepr(kwargs, 1024, maxlevels=template.repr_maxlevels) if kwargs else "{}"
            ),
            "origin": self._origin_name(),
            "ignore_result": ignore_result,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        if extra_headers:
            headers.update(extra_headers)
        properties: dict[str, Any] = {"correlation_id": task_id, "reply_to": app.thread_oid}
        if template.priority is not None:
            properties["priority"] = template.priority
        body = (args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
        declare = [destination.queue]
        policy = dict(template.retry_policy)

        # As TaskyardCelery.send_task: receivers of the signals learn which app sends.
        token = sending_app.set(app)
        try:
            if on_task_call is not None:
                with link.connection._reraise_as_library_errors():
                    on_task_call(None, task_id)
            before_task_publish.send(
                sender=name,
                body=body,
                exchange="",
                routing_key=queue,
                declare=declare,
                headers=headers,
                properties=properties,
                retry_policy=policy,
            )
            if (
                properties.keys() <= _PLAIN_PROPERTIES
                and len(declare) == 1
                and declare[0] is destination.queue
            ):
                self._put(link, template, destination, queue, body, headers, properties, policy)
            else:
                self._publish_with_kombu(
                    template, destination, queue, body, headers, properties, declare, policy
                )
            after_task_publish.send(
                sender=name, body=body, headers=headers, exchange="", routing_key=queue
            )
        finally:
            sending_app.reset(token)
        result = task.AsyncResult(task_id)
        result.ignored = ignore_result
        if parent is not None:
            parent.add_trail(result)
        return result

    def _put(
        self,
        link: _Link,
        template: _Template,
        destination: _Destination,
        queue: str,
        body: Any,
        headers: dict[str, Any],
        properties: dict[str, Any],
        policy: dict[str, Any],
    ) -> None:
        # kombu's Producer.publish serializes (EncodeError on a refused value, nothing sent).
        content_type, content_encoding, payload = registry.dumps(
            body, serializer=template.serializer
        )
        channel = link.channel
        # The message dict of kombu's virtual channel: prepare_message, then
        # _inplace_augment_message, keys in the order they produce.
        encoded, body_encoding = channel.encode_body(payload, channel.body_encoding)
        message = {
            "body": encoded,
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": {
                "correlation_id": properties.get("correlation_id"),
                "reply_to": properties.get("reply_to"),
                "delivery_mode": destination.delivery_mode_value,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": properties.get("priority") or channel.default_priority,
                "body_encoding": body_encoding,
                "delivery_tag": next_delivery_tag(),
            },
        }
        try:
            if queue not in link.declared:
                maybe_declare(destination.queue, channel)
                link.declared.add(queue)
            channel._put(queue, message)
        except link.connection_errors:
            # The connection broke: kombu's path reconnects and retries as the policy says.
            logger.debug("fast publish of %s refused; retrying through kombu", queue, exc_info=True)
            self._drop(link)
            self._publish_with_kombu(
                template,
                destination,
                queue,
                body,
                headers,
                properties,
                [destination.queue],
                policy,
            )
        except link.channel_errors as exc:
            # As kombu's _reraise_as_library_errors reports them in Celery's path.
            raise ChannelError(str(exc)) from exc

    def _publish_with_kombu(
        self,
        template: _Template,
        destination: _Destination,
        queue: str,
        body: Any,
        headers: dict[str, Any],
        properties: dict[str, Any],
        declare: list[Any],
        policy: dict[str, Any],
    ) -> None:
        """Publish as ``send_task_message`` does after ``before_task_publish``."""
        with self.app.producer_or_acquire() as producer:
            connection = producer.connection
            with connection._reraise_as_library_errors():
                producer.publish(
                    body,
                    exchange="",
                    routing_key=queue,
                    serializer=template.serializer,
                    compression=None,
                    retry=template.retry,
                    retry_policy=policy,
                    delivery_mode=destination.delivery_mode,
                    declare=declare,
                    headers=headers,
                    timeout=None,
                    confirm_timeout=None,
                    **properties,
                )

    # --- what is checked once -----------------------------------------------------------------
    def template(self, task: Any) -> _Template | None:
        """What every fast publish of ``task`` shares; None: it takes Celery's path."""
        verdict = self._verdicts.get(task.name)
        if (
            verdict is None
            or verdict.task is not task
            or verdict.exec_options is not task._get_exec_options()
            or verdict.router is not self.app.amqp.router
        ):
            verdict = self._verdict(task)
            self._verdicts[task.name] = verdict
        return verdict.template

    def _verdict(self, task: Any) -> _Verdict:
        """Whether ``task`` can be sent here: not when an option of its needs Celery's path."""
        app = self.app
        conf = app.conf
        exec_options = task._get_exec_options()
        router = app.amqp.router
        routes = router.routes
        verdict = _Verdict(task, exec_options, router, None)
        if (
            any(exec_options.get(name) is not None for name in _OWN_OPTIONS)
            or len(routes) != 1
            or routes[0] is not self.router
            or conf.task_protocol != 2
            or conf.task_compression
            or getattr(task, "__v2_compat__", False)
            or getattr(task, "_dump_pydantic_arguments", None) is not None
            or type(task).shadow_name is not Task.shadow_name
            or (task.soft_time_limit and task.time_limit and task.soft_time_limit > task.time_limit)
        ):
            return verdict
        template = _Template(
            check=getattr(task, "__header__", None) if task.typing else None,
            timelimit=(exec_options.get("time_limit"), exec_options.get("soft_time_limit")),
            priority=exec_options.get("priority"),
            serializer=exec_options.get("serializer") or conf.task_serializer,
            repr_maxlevels=conf.task_repr_maxlevels,
            retry=bool(conf.task_publish_retry),
            retry_policy=dict(conf.task_publish_retry_policy or {}),
        )
        return _Verdict(task, exec_options, router, template)

    def _destination(self, link: _Link, queue: str) -> _Destination | None:
        try:
            return link.destinations[queue]
        except KeyError:
            pass
        found = self.app.amqp.queues.get(queue)
        destination = None
        if (
            isinstance(found, Queue)
            and type(found) is Queue
            and found.name == queue
            and found.exchange is not None
            and found.exchange.type == "direct"
            and queue not in link.channel._expires
        ):
            mode = found.exchange.delivery_mode or self.app.conf.task_default_delivery_mode
            destination = _Destination(found, mode, maybe_delivery_mode(mode))
        link.destinations[queue] = destination
        return destination

    def _origin_name(self) -> str:
        pid, name = self._origin
        if pid != os.getpid():
            pid, name = os.getpid(), anon_nodename()
            self._origin = (pid, name)
        return name

    # --- the connection -------------------------------------------------------------------------
    def _connected(self) -> _Link | None:
        """This thread's link, connected now if needed; None: take Celery's path."""
        link: _Link | None = getattr(self._local, "link", None)
        if link is not None and link.pid == os.getpid() and link.generation == self._generation:
            return link
        if monotonic() < self._retry_at:
            return None
        # A link made before a fork belongs to the parent: left alone, never closed here.
        self._local.link = None
        generation = self._generation
        connection = self.app.connection_for_write()
        try:
            # One attempt: while the broker is away, Celery's path retries and reports.
            connection.ensure_connection(max_retries=0)
            channel = connection.default_channel
        except Exception:
            logger.debug("fast publish connection failed", exc_info=True)
            self._retry_at = monotonic() + RECONNECT_PAUSE_S
            _release(connection)
            return None
        if not isinstance(channel, Channel):
            self.enabled = False
            _release(connection)
            return None
        link = _Link(connection, channel, generation)
        with self._lock:
            self._links.add(link)
        self._local.link = link
        return link

    def _drop(self, link: _Link) -> None:
        if getattr(self._local, "link", None) is link:
            self._local.link = None
        with self._lock:
            self._links.discard(link)
        _release(link.connection)

    def close(self) -> None:
        """Close this process's connections (the next fast publish of a thread opens another)."""
        with self._lock:
            self._generation += 1
            links = [link for link in self._links if link.pid == os.getpid()]
            self._links.clear()
        for link in links:
            _release(link.connection)


def _release(connection: Any) -> None:
    try:
        connection.release()
    except Exception:  # a broken connection may fail to close; it is dropped either way
        logger.debug("closing the fast publish connection failed", exc_info=True)
