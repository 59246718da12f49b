"""Results when no result backend is configured: a clear error instead of a silent ``None``.

Without ``TASKYARD_RESULT_BACKEND`` tasks ignore their results (no backend write per task).
Celery's stand-in then answers ``result.get()`` with ``None`` at once and ``result.state`` with
an ``AttributeError`` of its own internals; a newcomer reads that as a task that returned
nothing. Here both raise :class:`~taskyard.errors.ResultsNotStored`, which says what to set.

Celery internals relied on (checked in tests/test_results.py): ``result_backend`` may name a
backend class as ``module:Class``; ``DisabledBackend`` is the stand-in's base; an app's
``AsyncResult`` is ``subclass_with_self`` of the class its ``AsyncResult`` property names.
"""

from __future__ import annotations

from typing import Any, NoReturn

from celery.backends.base import DisabledBackend
from celery.result import AsyncResult

from taskyard.errors import ResultsNotStored

#: The ``result_backend`` an app gets when none is configured.
BACKEND_PATH = "taskyard.results:NoResultBackend"

MESSAGE = (
    "results are not stored: set TASKYARD_RESULT_BACKEND (e.g. redis://127.0.0.1:6379/1; "
    "`taskyard up` sets one) to read a task's result or state; without it, tasks report "
    "through their effects"
)


def _refuse(*_: Any, **__: Any) -> NoReturn:
    raise ResultsNotStored(MESSAGE)


class NoResultBackend(DisabledBackend):  # type: ignore[misc]
    """Celery's stand-in backend, whose every read says how to store results."""

    get_state = get_status = get_result = get_traceback = _refuse
    get_task_meta_for = _get_task_meta_for = wait_for = get_many = _refuse

    def ensure_chords_allowed(self) -> None:
        raise ResultsNotStored(f"a chord needs stored results: {MESSAGE}")


class TaskyardAsyncResult(AsyncResult):  # type: ignore[misc]
    """``AsyncResult`` whose ``get()`` refuses, rather than returns None, without a backend."""

    def get(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.backend, DisabledBackend):
            _refuse()
        return super().get(*args, **kwargs)
