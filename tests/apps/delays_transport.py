"""A minimal kombu Redis transport that parks countdown/ETA messages through broker.delays.

Used by the delay tests when taskyard's own transport (``taskyard.broker.transport``) is not
there; it calls :func:`taskyard.broker.delays.maybe_delay` where that transport's ``_put`` does.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

from taskyard.broker import delays


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel whose ``_put`` tries the delayed set first."""

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        with self.conn_or_acquire() as client, client.pipeline() as pipe:
            if delays.maybe_delay(pipe, self, queue, message):
                pipe.execute()
                return
        super()._put(queue, message, **kwargs)


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
