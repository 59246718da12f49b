"""Property-based fuzz of the stats API from its own OpenAPI schema: no input gives a 500.

Every operation of ``/openapi.json`` is fuzzed with schemathesis' strategies, with inputs that
fit the schema (positive) and inputs that break it (negative), through the ASGI app on real
Redis holding a known state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import response_schema_conformance

from taskyard.monitoring.api.app import create_api
from tests.monitoring.api.test_api import TOKEN, api_settings, seed

#: Examples per operation and mode: over 20 operations x 2 modes in well under a minute.
MAX_EXAMPLES = 20


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gives_a_server_error(
    tmp_path: Path, redis_client: redis.Redis, mode: GenerationMode
) -> None:
    config = api_settings(tmp_path, api_token=TOKEN)
    seed(config, redis_client)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_api(config))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    unsatisfiable: list[str] = []
    for operation in operations:
        # With the token, admin bodies are fuzzed too (auth itself is tested in test_api_admin).
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
            # 501 is the documented answer of an admin action whose package is not installed.
            assert response.status_code < 500 or response.status_code == 501, (
                case.as_curl_command(),
                response.status_code,
                response.text,
            )
            if case.path != "/metrics":
                assert response.headers["content-type"][0].startswith("application/json")
            if response.status_code == 200 and not (case.query or {}).get("fields"):
                # Whole items must match the documented models (?fields= trims them).
                case.validate_response(response, checks=[response_schema_conformance])

        try:
            check()
        except Unsatisfiable:
            # An operation without parameters or body has no input to break (negative mode).
            unsatisfiable.append(operation.label)
    print("unsatisfiable:", unsatisfiable)
