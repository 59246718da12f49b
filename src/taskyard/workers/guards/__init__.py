"""Resource guards: admission by memory and CPU, deferral without loss, back-pressure.

See docs/guards.md. :func:`install` is called by ``create_app``; the rest is for tests, tools and
readers of the heartbeat.
"""

from taskyard.workers.guards.backpressure import Band, Valve
from taskyard.workers.guards.defer import HEADER_DEFERRALS, HEADER_SINCE, Counters, Deferrer
from taskyard.workers.guards.guard import Guard
from taskyard.workers.guards.install import guard_of, install
from taskyard.workers.guards.policy import Hold, Policy, Pressure
from taskyard.workers.guards.readings import MemoryReadings, Probe, Reading, Sampler

__all__ = [
    "HEADER_DEFERRALS",
    "HEADER_SINCE",
    "Band",
    "Counters",
    "Deferrer",
    "Guard",
    "Hold",
    "MemoryReadings",
    "Policy",
    "Pressure",
    "Probe",
    "Reading",
    "Sampler",
    "Valve",
    "guard_of",
    "install",
]
