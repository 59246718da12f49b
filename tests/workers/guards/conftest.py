"""Fixtures of the guard tests."""

from __future__ import annotations

from typing import Any

import pytest

from taskyard.workers.guards import (
    MemoryReadings,
    guard_of,
)
from tests.workers.guards.fakes import reading


@pytest.fixture
def guarded(make_app: Any) -> Any:
    app = make_app(
        "guardunit",
        guard={"defer_countdown_s": 1.0, "defer_jitter_s": 0.5, "max_defer_age_s": 60.0},
    )

    @app.task(name="unit.low", bind=True, shared=False)
    def low_task(self: Any, x: int, y: int = 0) -> int:
        return x + y

    guard = guard_of(app)
    assert guard is not None
    guard.source = MemoryReadings(reading(memory=95.0))
    return app, low_task, guard
