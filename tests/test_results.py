"""Without a result backend, reading a result says how to store results; with one, it works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
from celery.backends.base import DisabledBackend
from celery.result import AsyncResult

from taskyard import ResultsNotStored, priority_task
from taskyard.results import NoResultBackend, TaskyardAsyncResult
from taskyard.testing import celery_worker
from tests import servers


def test_the_celery_seams_exist() -> None:
    assert issubclass(NoResultBackend, DisabledBackend)
    assert issubclass(TaskyardAsyncResult, AsyncResult)


def test_get_state_and_chords_say_how_to_store_results(make_app: Any) -> None:
    app = make_app("noresults")

    @priority_task(app=app, name="noresults.add")
    def add(x: int, y: int) -> int:
        return x + y

    result = add.delay(2, 3)
    assert isinstance(app.backend, NoResultBackend)
    with pytest.raises(ResultsNotStored, match="TASKYARD_RESULT_BACKEND"):
        result.get(timeout=1)
    with pytest.raises(ResultsNotStored, match="TASKYARD_RESULT_BACKEND"):
        _ = result.state
    with pytest.raises(ResultsNotStored, match="chord"):
        app.backend.ensure_chords_allowed()


@pytest.mark.slow
def test_with_a_backend_a_result_comes_back(
    make_app: Any, redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**redis_env, "TASKYARD_RESULT_BACKEND": servers.REDIS_URL}
    app = make_app("withresults", result_backend=servers.REDIS_URL)
    with celery_worker("tests.apps.fivelevels", "normal", env, tmp_path, concurrency=1):
        result = app.send_task("tests.apps.fivelevels.on_normal", args=(41,), queue="normal")
        assert result.get(timeout=60) == 41 and result.state == "SUCCESS"
