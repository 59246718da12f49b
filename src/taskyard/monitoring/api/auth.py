"""Bearer-token check for the stats API's admin endpoints.

The token comes from ``TASKYARD_MONITORING__API_TOKEN``. Without a configured token the admin
endpoints are refused outright (never open); a missing or malformed ``Authorization`` header is
401 with ``WWW-Authenticate: Bearer``; a wrong token is 403. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

#: Documents the scheme in the OpenAPI schema; the checks themselves are in AdminAuth.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="adminToken",
    description="Admin token from TASKYARD_MONITORING__API_TOKEN.",
)

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="taskyard"'}


class AdminAuth:
    """FastAPI dependency that admits a request only with the configured bearer token."""

    def __init__(self, token: str | None) -> None:
        # Compared as bytes: compare_digest on str refuses non-ASCII input.
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        """Whether a token is configured (admin endpoints usable at all)."""
        return self._token is not None

    def check(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Raise the HTTP error for ``credentials``, or return when they carry the token."""
        if self._token is None:
            raise HTTPException(
                status_code=403,
                detail="admin endpoints are disabled: no token is configured "
                "(set TASKYARD_MONITORING__API_TOKEN)",
            )
        if credentials is None:
            raise HTTPException(
                status_code=401,
                detail="admin endpoint: send 'Authorization: Bearer <token>'",
                headers=_CHALLENGE,
            )
        given = credentials.credentials.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self._token):
            raise HTTPException(status_code=403, detail="admin endpoint: wrong bearer token")

    def __call__(
        self,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    ) -> None:
        self.check(credentials)
