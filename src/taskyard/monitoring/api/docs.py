"""``/docs`` served offline, and an OpenAPI document that names every body.

The Swagger UI bundle comes from the ``fastapi-offline`` package (its ``static/`` folder:
``swagger-ui-bundle.js``, ``swagger-ui.css``, ``favicon.png``), served under ``/static/docs``;
FastAPI's own page loads it from a CDN, which leaves ``/docs`` blank on a machine without
internet. The dashboard's vendored front-end code (uPlot) is served under ``/static/taskyard``.
There is no ``/redoc``: ReDoc's bundle links its logo from its vendor's CDN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

#: Where the docs bundles and the dashboard's assets are served.
DOCS_STATIC = "/static/docs"
TASKYARD_STATIC = "/static/taskyard"
#: The dashboard's own assets (vendored uPlot), shipped inside this package.
STATIC_DIR = Path(__file__).parents[1] / "dashboard" / "static"

#: The docs page may load nothing from another host (Swagger UI needs inline script and blob
#: workers; the dashboard's narrower policy is in headers.py): the browser enforces it.
DOCS_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; "
    "connect-src 'self'; font-src 'self' data:"
)

#: FastAPI documents request validation failures with its own HTTPValidationError; this API
#: answers them with its ErrorBody (``{"error": "invalid_request", "detail": [...]}``).
_FASTAPI_VALIDATION = "#/components/schemas/HTTPValidationError"
_ERROR_BODY = "#/components/schemas/ErrorBody"


def docs_assets() -> Path:
    """The folder of the Swagger UI and ReDoc bundles (from the fastapi-offline package)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def install_docs(api: FastAPI) -> None:
    """Serve ``/docs`` and the static assets from this machine only.

    ``api`` must be created with ``docs_url=None, redoc_url=None``.
    """
    api.mount(DOCS_STATIC, StaticFiles(directory=docs_assets()), name="docs-static")
    api.mount(TASKYARD_STATIC, StaticFiles(directory=STATIC_DIR), name="taskyard-static")
    openapi_url = api.openapi_url or "/openapi.json"
    favicon = f"{DOCS_STATIC}/favicon.png"

    @api.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return _local_only(
            get_swagger_ui_html(
                openapi_url=openapi_url,
                title=f"{api.title} - Swagger UI",
                swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
                swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
                swagger_favicon_url=favicon,
                # Swagger UI would otherwise ask validator.swagger.io to check the document.
                swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
            )
        )

    base_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = name_error_bodies(base_openapi())
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


def _local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_POLICY
    return page


def name_error_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with every validation-error response pointing at ErrorBody, as answered."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("$ref") == _FASTAPI_VALIDATION:
                return {"$ref": _ERROR_BODY}
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    fixed: dict[str, Any] = walk(schema)
    schemas = fixed.get("components", {}).get("schemas", {})
    if "HTTPValidationError" in schemas:
        schemas.pop("HTTPValidationError")
        # ValidationError is referenced only by HTTPValidationError.
        schemas.pop("ValidationError", None)
    for operations in fixed.get("paths", {}).values():
        for operation in operations.values():
            response = operation.get("responses", {}).get("422")
            if response is not None:
                response["description"] = (
                    "Invalid request: a parameter is missing, "
                    "malformed or out of range (ErrorBody, error "
                    '"invalid_request", detail lists the problems).'
                )
    return fixed
