"""`/docs` works offline; the OpenAPI document names every response body."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from taskyard.config import load_settings
from taskyard.monitoring.api.app import create_api
from taskyard.monitoring.api.docs import DOCS_STATIC, TASKYARD_STATIC, name_error_bodies
from taskyard.testing import ROOT
from tests import servers
from tests.monitoring.dashboard.test_browser import BROWSER_ARGS, CHROMIUM, require_browser

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return create_api(load_settings(redis_url="redis://127.0.0.1:1/0")).openapi()


def _schemas(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["components"]["schemas"]  # type: ignore[no-any-return]


def test_every_json_response_names_its_model(spec: dict[str, Any]) -> None:
    refs = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary") or operation.get("description"), (method, path)
            for status, response in operation["responses"].items():
                assert response.get("description"), (method, path, status)
                for media, body in response.get("content", {}).items():
                    schema = body.get("schema", {})
                    if media.startswith("text/plain"):
                        continue  # /metrics: the Prometheus text format
                    if schema.get("type") == "array":
                        schema = schema["items"]
                    assert "$ref" in schema, (method, path, status, schema)
                    refs.append(schema["$ref"].rsplit("/", 1)[1])
    # What FastAPI would document for a validation error is not what this API answers.
    assert "HTTPValidationError" not in refs and "HTTPValidationError" not in _schemas(spec)
    assert {"ErrorBody", "Overview", "QueueStats", "TaskStats", "HistoryPage"} <= set(refs)
    for name in refs:
        assert name in _schemas(spec), name


def test_validation_errors_are_documented_as_the_body_they_are(
    spec: dict[str, Any], redis_client: Any
) -> None:
    # A reachable Redis: with Redis down every route but health and docs is a 503 (credentials
    # cannot be checked), before any parameter is.
    client = TestClient(create_api(load_settings(redis_url=servers.REDIS_URL)))
    answer = client.get("/api/v1/history/queues", params={"limit": "many"})
    assert answer.status_code == 422
    body = answer.json()
    assert set(body) == set(_schemas(spec)["ErrorBody"]["properties"]) == {"error", "detail"}
    documented = spec["paths"]["/api/v1/history/{series}"]["get"]["responses"]["422"]
    assert documented["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }


def test_name_error_bodies_leaves_other_references_alone() -> None:
    given = {
        "paths": {
            "/x": {
                "get": {
                    "responses": {
                        "200": {
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/A"}}
                            }
                        },
                        "422": {
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/HTTPValidationError"}
                                }
                            }
                        },
                    }
                }
            }
        },
        "components": {
            "schemas": {"A": {}, "HTTPValidationError": {}, "ValidationError": {}, "ErrorBody": {}}
        },
    }
    fixed = name_error_bodies(given)
    responses = fixed["paths"]["/x"]["get"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/A")
    assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert set(fixed["components"]["schemas"]) == {"A", "ErrorBody"}


def test_docs_pages_reference_only_this_server() -> None:
    client = TestClient(create_api(load_settings(redis_url="redis://127.0.0.1:1/0")))
    page = client.get("/docs")
    html = page.text
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert DOCS_STATIC in html
    # The browser itself refuses anything from another host.
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert client.get("/redoc").status_code == 404
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"):
        assert client.get(f"{DOCS_STATIC}/{asset}").status_code == 200, asset
    assert client.get(f"{TASKYARD_STATIC}/uplot/uPlot.iife.min.js").status_code == 200


@pytest.fixture
def api_url(redis_env: dict[str, str], taskyard_api: Callable[[dict[str, str]], str]) -> str:
    return taskyard_api(redis_env)


@pytest.mark.browser
@pytest.mark.slow
def test_docs_render_in_chromium_with_nothing_fetched_from_elsewhere(api_url: str) -> None:
    require_browser()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requested: list[str] = []
            finished: list[str] = []
            failed: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.on("requestfinished", lambda request: finished.append(request.url))
            page.on(
                "requestfailed", lambda request: failed.append(f"{request.url} {request.failure}")
            )
            assert page.goto(api_url + "/docs").status == 200  # type: ignore[union-attr]
            page.wait_for_selector(".opblock-summary-path", timeout=20_000)
            paths = page.eval_on_selector_all(
                ".opblock-summary-path", "els => els.map(e => e.textContent.trim())"
            )
            assert "/api/v1/overview" in paths and "/metrics" in paths
            page.get_by_text("ErrorBody", exact=True).first.wait_for(timeout=10_000)
            page.screenshot(path=str(ARTIFACTS / "docs-swagger.png"), full_page=False)

            elsewhere = [
                u for u in requested if not u.startswith((api_url + "/", "data:", "blob:"))
            ]
            assert requested and not elsewhere, (elsewhere, failed, finished)
        finally:
            browser.close()


def test_monitoring_doc_names_every_endpoint_parameter_and_metric(
    spec: dict[str, Any], tmp_path: Path
) -> None:
    import re

    doc = (ROOT / "docs" / "monitoring.md").read_text()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert f"`{method.upper()} {path}`" in doc, f"{method.upper()} {path} undocumented"
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "query":
                    assert f"`{parameter['name']}`" in doc, (path, parameter["name"])
    assert "TASKYARD_MONITORING__API_TOKEN" in doc and "Authorization: Bearer" in doc
    # Every metric family /metrics exposes, by name (a family may be listed as a suffix group).
    import redis as redis_lib
    from fastapi.testclient import TestClient as Client
    from prometheus_client.parser import text_string_to_metric_families

    from tests import servers
    from tests.monitoring.api.test_api import api_settings, seed

    servers.require("redis")
    client = redis_lib.Redis.from_url(servers.REDIS_URL)
    client.flushdb()
    try:
        settings = api_settings(tmp_path)
        seed(settings, client)
        text = Client(create_api(settings)).get("/metrics").text
    finally:
        client.flushdb()
    documented = set(re.findall(r"`((?:celery|taskyard)_[a-z_]+)`", doc))
    for family in text_string_to_metric_families(text):
        names = {family.name, family.name + "_total"}
        assert names & documented, f"{family.name} is not in docs/monitoring.md"
