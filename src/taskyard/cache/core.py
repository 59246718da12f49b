"""Redis cache-aside: ``@cached``, a manual get/set API, versioned tags, stampede protection.

Each entry is one Redis string holding a JSON envelope ``{"v": value, "e": fresh-until,
"t": {tag: version}}``. A tag is one counter key; invalidating a tag increments it (O(1), one
key per tag whatever the number of entries). A read fetches the entry and the current versions
of its tags in one ``MGET`` and treats an entry stored under an older version as invalid; such
entries simply expire with their TTL, so nothing grows without bound.

Stampede protection: when an entry is missing, invalid or expired, one caller takes a short
recompute lock and computes; the others serve the expired value while it lasts (an entry stays
in Redis ``stale_grace_s`` beyond its freshness) or wait for the new one. Entries invalidated by
a tag are never served stale: invalidation means the data changed.

Hit, miss and latency counts per cache namespace are buffered in the process and written to
``keys.cache_stats(namespace)`` at most once a second; :func:`cache_stats` reads them back.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar, overload

import redis

from taskyard.cache.stats import Counters, cache_stats
from taskyard.errors import CacheError, ConfigurationError
from taskyard.runtime import Runtime, TaskyardApp, runtime_of

log = logging.getLogger(__name__)

__all__ = ["Cache", "cache_for", "cache_stats", "cached"]

P = ParamSpec("P")
R = TypeVar("R")

_MISSING: Any = object()
#: Counters are written to Redis at most this often (s): one pipeline instead of one write per
#: read keeps a hit a single round trip.
STATS_FLUSH_INTERVAL_S = 1.0
#: Envelope decoding without json.loads' type and encoding checks (the hit path).
_DECODE = json.JSONDecoder().decode
#: How often a waiting reader looks for the value another process is computing (s).
_POLL_S = 0.01


class Cache:
    """Cache-aside over the runtime's Redis (one per app; see :func:`cache_for`)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.keys = runtime.keys
        self.settings = runtime.settings.cache
        self._counters = Counters()
        # Key prefixes, so the hit path formats strings instead of calling the key schema.
        self._value_prefix = self.keys.cache_value("", "")[:-1]
        self._tag_prefix = self.keys.cache_tag_version("")

    # --- configuration --------------------------------------------------------------------
    def ttl_for(self, resource: str | None) -> float:
        """TTL (s) of a resource type from ``TASKYARD_CACHE__TTL_S``.

        Raises:
            ConfigurationError: the resource type has no TTL there.
        """
        table = self.settings.ttl_s
        name = resource or "default"
        if name not in table:
            if resource is None:
                return 900.0
            raise ConfigurationError(
                f"cache resource type {name!r} has no TTL in TASKYARD_CACHE__TTL_S; "
                f"known types: {', '.join(sorted(table))}",
                setting="TASKYARD_CACHE__TTL_S",
                value=name,
            )
        return float(table[name])

    # --- reading --------------------------------------------------------------------------
    def _mget(self, names: list[str]) -> list[Any]:
        """MGET on a pooled connection directly: the hit path's one round trip.

        redis-py's client wrapper costs about as much as the command itself on loopback; a
        connection or timeout error falls back to the client, which retries.
        """
        client = self.runtime.redis
        pool = client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command("MGET", *names)  # type: ignore[no-untyped-call]
            return conn.read_response()  # type: ignore[no-any-return]
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()  # type: ignore[no-untyped-call]
            return client.mget(names)
        finally:
            pool.release(conn)

    def _fetch(self, namespace: str, key: str, tags: Sequence[str]) -> tuple[Any, str]:
        """(value, state): state is "fresh", "stale" (expired, servable), "invalid" or "miss"."""
        tag_prefix = self._tag_prefix
        names = [f"{self._value_prefix}{namespace}:{key}"]
        names.extend([tag_prefix + tag for tag in tags])
        raw, *versions = self._mget(names)
        if raw is None:
            return _MISSING, "miss"
        envelope = _DECODE(raw.decode())
        stored: dict[str, int] = envelope["t"]
        if stored:
            current = {tag: int(v or 0) for tag, v in zip(tags, versions, strict=True)}
            unknown = [tag for tag in stored if tag not in current]
            if unknown:  # the caller did not name every tag of the entry: one more round trip
                extra = self._mget([tag_prefix + t for t in unknown])
                current.update({tag: int(v or 0) for tag, v in zip(unknown, extra, strict=True)})
            for tag, version in stored.items():
                if current[tag] != version:
                    return envelope["v"], "invalid"
        if envelope["e"] < time.time():
            return envelope["v"], "stale"
        return envelope["v"], "fresh"

    def get(
        self, namespace: str, key: str, default: Any = None, *, tags: Sequence[str] = ()
    ) -> Any:
        """The fresh cached value, or ``default``."""
        started = time.perf_counter()
        value, state = self._fetch(namespace, key, tags)
        hit = state == "fresh"
        self._count(namespace, started, hits=1 if hit else 0, misses=0 if hit else 1)
        return value if hit else default

    # --- writing --------------------------------------------------------------------------
    def _tag_versions(self, tags: Sequence[str]) -> dict[str, int]:
        if not tags:
            return {}
        versions = self.runtime.redis.mget([self.keys.cache_tag_version(t) for t in tags])
        return {tag: int(v or 0) for tag, v in zip(tags, versions, strict=True)}

    def set(
        self,
        namespace: str,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        resource: str | None = None,
        tags: Sequence[str] = (),
        _versions: dict[str, int] | None = None,
    ) -> None:
        """Store ``value`` (JSON-encodable) for ``ttl`` seconds (default: the resource's TTL).

        Raises:
            CacheError: the value cannot be encoded as JSON, or the TTL is not positive.
        """
        if ttl is not None:
            ttl_s = float(ttl)
        else:
            # An explicit resource type, else a namespace named after one, else the default.
            known = namespace if namespace in self.settings.ttl_s else None
            ttl_s = self.ttl_for(resource or known)
        if ttl_s <= 0:
            raise CacheError(f"cache TTL must be > 0 s, got {ttl_s!r} for {namespace}:{key}")
        versions = self._tag_versions(tags) if _versions is None else _versions
        try:
            payload = json.dumps(
                {"v": value, "e": time.time() + ttl_s, "t": versions}, separators=(",", ":")
            )
        except (TypeError, ValueError) as exc:
            raise CacheError(
                f"cannot cache {namespace}:{key}: value of type {type(value).__name__} is not "
                f"JSON-encodable ({exc})"
            ) from None
        grace = self.runtime.settings.cache.stale_grace_s
        self.runtime.redis.set(
            self.keys.cache_value(namespace, key), payload, px=max(1, int((ttl_s + grace) * 1000))
        )
        self._counters.add(namespace, sets=1)

    def delete(self, namespace: str, key: str) -> bool:
        """Drop one entry; True when it existed."""
        return bool(self.runtime.redis.delete(self.keys.cache_value(namespace, key)))

    def invalidate(self, *tags: str) -> dict[str, int]:
        """Invalidate every entry stored under any of ``tags``; returns their new versions."""
        pipe = self.runtime.redis.pipeline(transaction=False)
        for tag in tags:
            pipe.incr(self.keys.cache_tag_version(tag))
        return {tag: int(v) for tag, v in zip(tags, pipe.execute(), strict=True)}

    # --- cache-aside with stampede protection ---------------------------------------------
    def get_or_compute(
        self,
        namespace: str,
        key: str,
        compute: Callable[[], Any],
        *,
        ttl: float | None = None,
        resource: str | None = None,
        tags: Sequence[str] = (),
    ) -> Any:
        """The cached value, or ``compute()`` stored: one computation at a time per key.

        With Redis unreachable the value is computed without the cache (logged): the cache
        speeds the application up, it must not take it down.
        """
        computed: list[Any] = []
        try:
            return self._get_or_compute(namespace, key, compute, ttl, resource, tags, computed)
        except redis.RedisError as exc:
            log.warning("cache %s:%s unavailable, computing without it: %s", namespace, key, exc)
            self._counters.add(namespace, errors=1)
            return computed[0] if computed else compute()

    def _get_or_compute(
        self,
        namespace: str,
        key: str,
        compute: Callable[[], Any],
        ttl: float | None,
        resource: str | None,
        tags: Sequence[str],
        computed: list[Any],
    ) -> Any:
        started = time.perf_counter()
        value, state = self._fetch(namespace, key, tags)
        if state == "fresh":
            counters = self._counters
            counters.hit(namespace, (time.perf_counter() - started) * 1e6)
            if time.monotonic() - counters.last_flush >= STATS_FLUSH_INTERVAL_S:
                self.flush_stats()
            return value
        lock_key = self.keys.cache_recompute(namespace, key)
        wait_s = self.settings.stampede_wait_s
        deadline = time.monotonic() + wait_s
        while True:
            token = os.urandom(8).hex()
            if self.runtime.redis.set(lock_key, token, nx=True, px=int(wait_s * 1000)):
                try:
                    # Another process may have stored the value between our read and the lock.
                    value, state = self._fetch(namespace, key, tags)
                    if state == "fresh":
                        self._count(namespace, started, hits=1, waited=1)
                        return value
                    return self._compute(
                        namespace, key, compute, ttl, resource, tags, started, computed
                    )
                finally:
                    _release(self.runtime.redis, lock_key, token)
            if state == "stale":
                # Someone is already recomputing: serve the expired value meanwhile.
                self._count(namespace, started, stale=1, hits=1)
                return value
            if time.monotonic() >= deadline:
                log.warning(
                    "cache %s:%s: recompute by another process exceeded %.1f s, computing here",
                    namespace,
                    key,
                    wait_s,
                )
                return self._compute(
                    namespace, key, compute, ttl, resource, tags, started, computed
                )
            time.sleep(_POLL_S)
            value, state = self._fetch(namespace, key, tags)
            if state == "fresh":
                self._count(namespace, started, hits=1, waited=1)
                return value

    def _compute(
        self,
        namespace: str,
        key: str,
        compute: Callable[[], Any],
        ttl: float | None,
        resource: str | None,
        tags: Sequence[str],
        started: float,
        computed: list[Any],
    ) -> Any:
        # Versions are read before computing: an invalidation during the computation leaves
        # the new entry already stale instead of hiding the change.
        versions = self._tag_versions(tags)
        computed_at = time.perf_counter()
        value = compute()
        computed.append(value)  # a Redis failure from here on must not compute it again
        compute_s = time.perf_counter() - computed_at
        self.set(namespace, key, value, ttl=ttl, resource=resource, tags=tags, _versions=versions)
        self._count(namespace, started, misses=1, compute_s=compute_s)
        return value

    # --- clearing ---------------------------------------------------------------------------
    def clear_tag(
        self, tag: str, *, batch: int = 500, progress: Callable[[int, int], None] | None = None
    ) -> int:
        """Invalidate ``tag`` at once, then delete its entries to free memory; returns how many.

        ``progress(scanned, deleted)`` is called after each batch of scanned keys.
        """
        self.invalidate(tag)
        pattern = self.keys.cache_value("*", "*")
        scanned = deleted = 0
        client = self.runtime.redis
        for chunk in _chunks(client.scan_iter(match=pattern, count=batch), batch):
            scanned += len(chunk)
            doomed = [
                name
                for name, raw in zip(chunk, client.mget(chunk), strict=True)
                if raw is not None and tag in json.loads(raw).get("t", {})
            ]
            if doomed:
                deleted += int(client.unlink(*doomed))
            if progress is not None:
                progress(scanned, deleted)
        return deleted

    # --- statistics ---------------------------------------------------------------------------
    def _count(self, namespace: str, started: float, **counts: float) -> None:
        counts["latency_us"] = (time.perf_counter() - started) * 1e6
        counts["reads"] = 1
        self._counters.add(namespace, **counts)
        if time.monotonic() - self._counters.last_flush >= STATS_FLUSH_INTERVAL_S:
            self.flush_stats()

    def flush_stats(self) -> None:
        """Write buffered counters to Redis now (a failure is logged; counts are dropped)."""
        taken = self._counters.take()
        if not taken:
            return
        try:
            pipe = self.runtime.redis.pipeline(transaction=False)
            for namespace, counts in taken.items():
                pipe.sadd(self.keys.cache_namespaces(), namespace)
                for name, amount in counts.items():
                    if name in {"compute_s", "latency_us"}:
                        pipe.hincrbyfloat(self.keys.cache_stats(namespace), name, amount)
                    else:
                        pipe.hincrby(self.keys.cache_stats(namespace), name, int(amount))
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("cache stats not written: %s", exc)


_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def _release(client: redis.Redis, lock_key: str, token: str) -> None:
    # Atomic compare-and-delete: never drop a lock that expired and was taken by someone else.
    client.eval(_RELEASE, 1, lock_key, token)


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_CACHES: dict[int, Cache] = {}
_CACHES_LOCK = threading.Lock()


def cache_for(app_or_runtime: Any = None) -> Cache:
    """The :class:`Cache` of an app (or runtime); the current Celery app when none is given."""
    if isinstance(app_or_runtime, Runtime):
        runtime = app_or_runtime
    else:
        if app_or_runtime is None:
            from celery import current_app

            app_or_runtime = current_app._get_current_object()
        runtime = runtime_of(app_or_runtime)
    cache = _CACHES.get(id(runtime))
    if cache is None or cache.runtime is not runtime:
        with _CACHES_LOCK:
            cache = _CACHES.get(id(runtime))
            if cache is None or cache.runtime is not runtime:
                cache = _CACHES[id(runtime)] = Cache(runtime)
    return cache


# --- the decorator ----------------------------------------------------------------------------
_KEY_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


def _key_of(args: dict[str, Any]) -> str:
    # Arguments come in signature order, so the same call always gives the same key.
    try:
        return _KEY_ENCODER.encode(args)
    except (TypeError, ValueError) as exc:
        raise CacheError(f"cannot build a cache key from arguments {args!r}: {exc}") from None


@overload
def cached(func: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def cached(
    *,
    ttl: float | None = None,
    tags: Sequence[str] = (),
    resource: str | None = None,
    namespace: str | None = None,
    app: TaskyardApp | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def cached(
    func: Callable[P, R] | None = None,
    /,
    *,
    ttl: float | None = None,
    tags: Sequence[str] = (),
    resource: str | None = None,
    namespace: str | None = None,
    app: TaskyardApp | None = None,
) -> Any:
    """Cache a function's JSON-encodable result, keyed by its arguments.

    ``tags`` may name arguments, formatted per call (``"user:{user_id}"``). The TTL is ``ttl``,
    else the ``resource`` type's TTL from settings, else the default. Entries live in the cache
    namespace ``namespace`` (default: the resource type, else "default"), which is also the unit
    of the hit/miss statistics. ``app`` defaults to the current Celery app.

    The wrapper has ``.invalidate(*args, **kwargs)`` to drop one call's entry and
    ``.prime(value, *args, **kwargs)`` to store a value computed elsewhere (warmers loading many
    entries with one query).

    Raises:
        ConfigurationError: at decoration, a non-positive ttl or a tag naming no argument.
    """
    if ttl is not None and ttl <= 0:
        raise ConfigurationError(f"@cached ttl must be > 0 s, got {ttl!r}", value=ttl)
    if isinstance(tags, str):
        raise ConfigurationError(
            f"@cached tags must be a list of names, got the string {tags!r}", value=tags
        )

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)
        for tag in tags:
            for part in tag.split("{")[1:]:
                arg = part.split("}")[0]
                if arg not in signature.parameters:
                    raise ConfigurationError(
                        f"@cached tag {tag!r} of {fn.__qualname__} names no argument {arg!r}; "
                        f"arguments: {', '.join(signature.parameters)}",
                        value=tag,
                    )
        ns = namespace or resource or "default"
        prefix = f"{fn.__module__}.{fn.__qualname__}"
        templated = any("{" in tag for tag in tags)

        names = tuple(signature.parameters)
        # Plain parameters only (no *args/**kwargs): a call giving every argument positionally
        # maps to its arguments without inspect's bind, the costliest step of a cache hit.
        plain = all(
            p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in signature.parameters.values()
        )
        static_tags = list(tags)

        def locate(args: Any, kwargs: Any) -> tuple[str, list[str]]:
            if plain and not kwargs and len(args) == len(names):
                arguments = dict(zip(names, args, strict=True))
            else:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
            key = f"{prefix}:{_key_of(arguments)}"
            if templated:
                return key, [tag.format(**arguments) for tag in tags]
            return key, static_tags

        resolved: list[Cache] = []

        def current_cache() -> Cache:
            if app is None:
                return cache_for(None)  # the current app may change between calls
            if not resolved:
                resolved.append(cache_for(app))
            return resolved[0]

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            key, call_tags = locate(args, kwargs)
            cache = current_cache()
            result: R = cache.get_or_compute(
                ns, key, lambda: fn(*args, **kwargs), ttl=ttl, resource=resource, tags=call_tags
            )
            return result

        def invalidate(*args: Any, **kwargs: Any) -> bool:
            key, _ = locate(args, kwargs)
            return cache_for(app).delete(ns, key)

        def prime(value: Any, *args: Any, **kwargs: Any) -> None:
            key, call_tags = locate(args, kwargs)
            cache_for(app).set(ns, key, value, ttl=ttl, resource=resource, tags=call_tags)

        wrapper.invalidate = invalidate  # type: ignore[attr-defined]
        wrapper.prime = prime  # type: ignore[attr-defined]
        wrapper.cache_namespace = ns  # type: ignore[attr-defined]
        return wrapper

    return decorate if func is None else decorate(func)
