"""Background loops: how one reports a failure that repeats on every tick, and the periodic
worker thread most of them are.

A flusher or watcher thread meets the same error every second while Redis or the broker is
down. Logging each one, traceback and all, buries the log an operator reads; logging none hides
the outage. :class:`Outage` logs the first failure of an outage with its traceback, then one
line at most every ``every_s`` seconds while it lasts, and one line when it ends.

:class:`Periodic` runs a job every interval on a daemon thread, through an :class:`Outage`;
:func:`in_workers` starts one in each worker of an app when it is ready and stops it at
shutdown (the dead-letter upkeep, the batch flusher).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.signals import worker_ready, worker_shutdown


class Outage:
    """The failures of one background job, ``what`` (e.g. "writing task metrics")."""

    def __init__(self, logger: logging.Logger, what: str, every_s: float = 30.0) -> None:
        self.logger = logger
        self.what = what
        self.every_s = every_s
        self.failures = 0
        self._last_logged = 0.0

    def failed(self, exc: BaseException, detail: str = "") -> None:
        """Record one failure (call from inside the ``except`` block)."""
        self.failures += 1
        now = time.monotonic()
        suffix = f" ({detail})" if detail else ""
        if self.failures == 1:
            self._last_logged = now
            self.logger.warning("%s failed%s; retrying", self.what, suffix, exc_info=exc)
        elif now - self._last_logged >= self.every_s:
            self._last_logged = now
            self.logger.warning(
                "%s still failing after %d attempts%s: %r", self.what, self.failures, suffix, exc
            )

    def ok(self) -> None:
        """Record a success; ends an outage, if one was under way."""
        if self.failures:
            self.logger.info("%s works again after %d failures", self.what, self.failures)
            self.failures = 0


class Periodic(threading.Thread):
    """Runs ``job()`` every ``interval_s`` until stopped (a daemon thread); a failing job is
    logged through an :class:`Outage` named ``what`` and runs again at the next interval."""

    def __init__(
        self,
        name: str,
        interval_s: float,
        job: Callable[[], object],
        logger: logging.Logger,
        what: str,
    ) -> None:
        super().__init__(daemon=True, name=name)
        self.interval_s = interval_s
        self.job = job
        self._stop_event = threading.Event()
        self._outage = Outage(logger, what)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.job()
            except Exception as exc:  # the next interval retries
                self._outage.failed(exc)
            else:
                self._outage.ok()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop_event.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout_s)


def in_workers(app: Any, make: Callable[[], Periodic]) -> None:
    """Start one ``make()`` thread in each worker of ``app`` once it is ready, and stop it at
    the worker's shutdown (connects signals only; no thread starts here)."""
    threads: list[Periodic] = []

    def start(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app or threads:
            return
        thread = make()
        thread.start()
        threads.append(thread)

    def stop(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        while threads:
            threads.pop().stop()

    worker_ready.connect(start, weak=False)
    worker_shutdown.connect(stop, weak=False)
