"""Redis cache-aside (``@cached``, versioned tags, stampede protection) and its warmers."""

from __future__ import annotations

from taskyard.cache.core import Cache, cache_for, cache_stats, cached
from taskyard.cache.warming import CACHE_WARM_TASK, install, periodic_jobs

__all__ = [
    "CACHE_WARM_TASK",
    "Cache",
    "cache_for",
    "cache_stats",
    "cached",
    "install",
    "periodic_jobs",
]
