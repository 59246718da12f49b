"""How a background loop reports a failure that repeats on every tick.

A flusher or watcher thread meets the same error every second while Redis or the broker is
down. Logging each one, traceback and all, buries the log an operator reads; logging none hides
the outage. :class:`Outage` logs the first failure of an outage with its traceback, then one
line at most every ``every_s`` seconds while it lasts, and one line when it ends.
"""

from __future__ import annotations

import logging
import time


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
