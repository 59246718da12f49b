"""Redis cache-aside (``@cached``, versioned tags, stampede protection) and its warmers."""

from __future__ import annotations

from taskyard.cache.core import Cache, cache_for, cache_stats, cached
from taskyard.cache.warming import install

__all__ = ["Cache", "cache_for", "cache_stats", "cached", "install"]
