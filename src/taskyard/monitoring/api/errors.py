"""Error responses of the stats API: every error is JSON ``{"error": code, "detail": ...}``.

An unreachable dependency is a 503 that names it (Redis, the database, the broker); anything
unexpected is a logged 500 with a JSON body, never a traceback sent to the client.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from taskyard.monitoring.api.headers import secure_headers

log = logging.getLogger(__name__)


def _code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def error_response(
    status: int, error: str, detail: object, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON error body every failure of the API uses."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def unavailable(part: str, exc: Exception) -> JSONResponse:
    # The driver's message names host and port, never the password of the URL.
    reason = str(exc).strip() or type(exc).__name__
    log.warning("stats API: %s unavailable: %s", part, reason)
    return error_response(
        503, f"{part}_unavailable", f"{part} is unreachable: {reason}", headers={"Retry-After": "5"}
    )


def install_error_handlers(api: FastAPI) -> None:
    """Register the JSON error handlers on ``api``."""

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(
            exc.status_code,
            _code(exc.status_code),
            exc.detail,
            headers=getattr(exc, "headers", None),
        )

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "invalid_request", jsonable_encoder(exc.errors()))

    async def redis_error(request: Request, exc: Exception) -> JSONResponse:
        return unavailable("redis", exc)

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        return unavailable("database", exc)

    async def broker_error(request: Request, exc: Exception) -> JSONResponse:
        return unavailable("broker", exc)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("stats API: unexpected error on %s %s", request.method, request.url.path)
        response = error_response(
            500, "internal_error", f"unexpected {type(exc).__name__}; see the API's log"
        )
        # Answered by Starlette's outermost middleware, past SecurityHeaders (api/headers.py).
        secure_headers(response.headers)
        return response

    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(redis.exceptions.RedisError, redis_error)
    from kombu.exceptions import OperationalError as BrokerOperationalError
    from sqlalchemy.exc import OperationalError as DatabaseOperationalError

    from taskyard.errors import BrokerUnavailable

    api.add_exception_handler(DatabaseOperationalError, database_error)
    api.add_exception_handler(BrokerOperationalError, broker_error)
    api.add_exception_handler(BrokerUnavailable, broker_error)
    api.add_exception_handler(Exception, unexpected)
