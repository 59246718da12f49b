"""The consuming channel's maintenance thread: lease renewal and the ``on_tick`` hooks.

A thread rather than an event-loop timer: on the solo pool a task runs on the loop's own
thread, and a task ten times longer than the lease must keep its lease all the same.
"""

from __future__ import annotations

import logging
import threading
from time import monotonic
from typing import TYPE_CHECKING

from taskyard.outage import Outage

if TYPE_CHECKING:
    from taskyard.broker.transport import Channel

logger = logging.getLogger(__name__)

#: How often the ``on_tick`` hooks run (s): broker-side delays become due within this.
TICK_INTERVAL_S = 0.25


class Maintenance(threading.Thread):
    """Renews the leases of a channel's held messages every third of the lease, runs hooks."""

    def __init__(self, channel: Channel, lease_s: float) -> None:
        super().__init__(name="taskyard-broker-maintenance", daemon=True)
        self.channel = channel
        self.lease_s = lease_s
        self._stopped = threading.Event()
        self._renewals = Outage(logger, "renewing reservation leases")

    @property
    def renew_interval_s(self) -> float:
        return self.lease_s / 3

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(5)

    def run(self) -> None:
        next_renewal = monotonic() + self.renew_interval_s
        while not self._stopped.wait(TICK_INTERVAL_S):
            for hook in list(self.channel.on_tick):
                try:
                    hook()
                except Exception:
                    logger.warning("broker tick hook %r failed", hook, exc_info=True)
            if self.lease_s and monotonic() >= next_renewal:
                next_renewal = monotonic() + self.renew_interval_s
                try:
                    self.channel.renew_leases()
                except Exception as exc:
                    # Retried at the next tick: a lease outlives several missed renewals only
                    # when Redis stays unreachable, and then the sweep cannot run either.
                    next_renewal = monotonic() + 1.0
                    self._renewals.failed(exc)
                else:
                    self._renewals.ok()
