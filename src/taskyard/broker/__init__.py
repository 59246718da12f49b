"""taskyard's Redis fetch/ack path: a kombu transport with an atomic fetch, batched acks and
leased reservations, chosen by the app's configuration (``broker_transport``)."""

from __future__ import annotations

import ssl
from typing import Any

#: ``broker_transport`` values naming the transports (kombu resolves "module:Class").
REDIS_TRANSPORT = "taskyard.broker.transport:Transport"
SENTINEL_TRANSPORT = "taskyard.broker.transport:SentinelTransport"


def broker_transport_config(broker_url: str) -> dict[str, Any]:
    """Celery settings that put a Redis broker URL on taskyard's transport.

    ``redis+socket://`` URLs stay on kombu's transport: kombu takes the transport from the
    part before ``+`` even when one is configured.
    """
    scheme = broker_url.split("://", 1)[0]
    if scheme == "sentinel":
        return {"broker_transport": SENTINEL_TRANSPORT}
    if scheme == "redis":
        return {"broker_transport": REDIS_TRANSPORT}
    if scheme == "rediss":
        # kombu.Connection turns TLS on for the "rediss" transport name only; with a transport
        # class named it must be asked for, with kombu's own default for a rediss URL.
        return {
            "broker_transport": REDIS_TRANSPORT,
            "broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_NONE},
        }
    return {}


__all__ = ["REDIS_TRANSPORT", "SENTINEL_TRANSPORT", "broker_transport_config"]
