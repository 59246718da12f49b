"""The headers every answer of the stats API carries, set in one place.

Every answer (JSON, Prometheus text, static files, pages, errors) says ``X-Content-Type-Options:
nosniff``, so a browser never reads a JSON body that echoes task text as HTML. Every HTML answer
without a policy of its own gets :data:`PAGE_POLICY`: nothing is loaded from another host and
scripts come from this server only (``/docs`` sets its own, wider policy for Swagger UI).

:class:`SecurityHeaders` is a pure ASGI middleware, so it also covers streamed and static
answers. Starlette answers an unhandled exception (500) from its outermost
``ServerErrorMiddleware``, outside every user middleware: the 500 handler adds
:func:`secure_headers` itself (``monitoring/api/errors.py``).
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The dashboard pages may load nothing from another host; the browser enforces it. Inline
#: ``style`` attributes carry the chart colours; there is no inline script.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'"
)


def secure_headers(headers: MutableHeaders) -> None:
    """Add ``nosniff``, and the page policy to an HTML answer that has no policy yet."""
    headers["X-Content-Type-Options"] = "nosniff"
    if headers.get("content-type", "").startswith("text/html"):
        headers.setdefault("Content-Security-Policy", PAGE_POLICY)


class SecurityHeaders:
    """ASGI middleware applying :func:`secure_headers` to every HTTP answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                secure_headers(MutableHeaders(scope=message))
            await send(message)

        await self.app(scope, receive, send_secured)
