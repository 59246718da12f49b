"""The bearer scheme of the stats API, as the OpenAPI schema documents it.

The checks themselves (the admin token, users' tokens, sessions, roles) are in
:mod:`taskyard.monitoring.api.access`.
"""

from __future__ import annotations

from fastapi.security import HTTPBearer

#: Documents the scheme in the OpenAPI schema (Swagger UI's *Authorize* takes a token).
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="adminToken",
    description="A user's token (`taskyard users token NAME`) or the admin token of "
    "TASKYARD_MONITORING__API_TOKEN.",
)
