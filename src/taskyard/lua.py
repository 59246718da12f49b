"""The one way taskyard runs Lua on Redis: scripts read from ``.lua`` files, called by SHA.

Every script lives in a ``.lua`` file beside the module that runs it (shipped as package data),
with a header saying what it makes atomic, its KEYS, ARGV and reply. A :class:`Script` is built
from one file or from several fragments concatenated in a fixed order
(:meth:`Script.from_files`), and is called in one of four ways:

* ``script(client, keys, args)``: EVALSHA, loading the source again after NOSCRIPT (a Redis
  restart or ``SCRIPT FLUSH`` empties the server's script cache);
* ``script.queue(pipe, keys, args)``: into a pipeline, run by :func:`run_pipeline`, which loads
  the scripts first and runs the pipeline again when the server answered NOSCRIPT;
* ``script.command(keys, args)``: the bare command words, for a caller that sends on a
  connection without waiting for the reply (the transport's fetch);
* ``script.fast(client, keys, args)``: on a connection the calling thread keeps (the per-item
  paths, a batch append and a publish, where borrowing a pooled connection costs more than
  the script).

Keys are passed as they are, never rewritten: the calls go through ``redis.Redis``'s own
``execute_command`` (and the pipeline's), so kombu's key-prefixing client, whose
``execute_command`` prefixes only the first key of an EVALSHA, leaves keys that already carry
the prefix alone.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, NamedTuple

import redis
from redis.client import Pipeline
from redis.connection import HiredisRespSerializer

_hiredis_pack: Callable[..., Any] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis-py packs in Python then
    _hiredis_pack = None

# redis-py's execute_command and its pipeline's are unannotated.
# mypy: disable-error-code="no-untyped-call"

# The unbound methods, called with the client as first argument: the cheapest call that skips a
# subclass's override (kombu's key prefixing).
_execute = redis.Redis.execute_command
_queue = Pipeline.execute_command


class Fragment(NamedTuple):
    """One piece of a script's source: where it came from, and its text."""

    name: str
    text: str


def fragments(package: str, *patterns: str) -> list[Fragment]:
    """The ``.lua`` files of ``package`` named by ``patterns``, in the order given.

    A pattern is a path relative to the package directory; ``*`` and ``?`` in its last part
    match several files, taken in name order, and a pattern with wildcards may match none (an
    extension point nobody filled yet). A plain name must exist.
    """
    root = resources.files(package)
    found: list[Fragment] = []
    for pattern in patterns:
        folder, _, leaf = pattern.rpartition("/")
        where: Traversable = root.joinpath(folder) if folder else root
        if not any(c in leaf for c in "*?["):
            found.append(Fragment(pattern, where.joinpath(leaf).read_text(encoding="utf-8")))
            continue
        if not where.is_dir():
            continue
        for entry in sorted(where.iterdir(), key=lambda e: e.name):
            if entry.is_file() and fnmatch.fnmatchcase(entry.name, leaf):
                name = f"{folder}/{entry.name}" if folder else entry.name
                found.append(Fragment(name, entry.read_text(encoding="utf-8")))
    return found


class Script:
    """A Lua script called by SHA on a client, in a pipeline or as raw command words."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, source: str, name: str = "script") -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    @classmethod
    def from_file(cls, package: str, path: str) -> Script:
        """The script in ``path`` (relative to ``package``'s directory)."""
        return cls.from_files(package, path)

    @classmethod
    def from_files(cls, package: str, *patterns: str) -> Script:
        """One script from several files of ``package`` (see :func:`fragments`), in order.

        The fragments form one Lua chunk, so a local a fragment defines is visible to every
        fragment after it: shared helpers and hooks go first, the main body last.
        """
        return cls.join(fragments(package, *patterns))

    @classmethod
    def join(cls, parts: Iterable[Fragment]) -> Script:
        """One script from fragments in the order given; each opens with its name as a comment
        so a reader (or an error's line number) can find where a line came from."""
        parts = list(parts)
        if not parts:
            raise ValueError("a script needs at least one fragment")
        source = "".join(f"-- {part.name}\n{part.text.rstrip()}\n" for part in parts)
        return cls(source, parts[-1].name)

    def __repr__(self) -> str:
        return f"<Script {self.name} {self.sha[:8]}>"

    def __call__(self, client: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        execute = _execute if isinstance(client, redis.Redis) else type(client).execute_command
        try:
            return execute(client, "EVALSHA", self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.load(client)
            return execute(client, "EVALSHA", self.sha, len(keys), *keys, *args)

    def load(self, client: Any) -> None:
        """Load the source into ``client``'s server (SCRIPT LOAD names no key)."""
        client.script_load(self.source)

    def command(self, keys: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        """The EVALSHA command words, for sending on a connection without waiting."""
        return ["EVALSHA", self.sha, len(keys), *keys, *args]

    def queue(self, pipe: Any, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Add a call to ``pipe``; run it with :func:`run_pipeline` (NOSCRIPT handling)."""
        if isinstance(pipe, Pipeline):
            _queue(pipe, "EVALSHA", self.sha, len(keys), *keys, *args)
        else:
            pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    def fast(self, client: redis.Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Like calling the script, on a connection this thread keeps: the per-item path.

        Borrowing a pooled connection and the client's retry and instrumentation layers cost
        more than the script itself on a one-item append. Any error other than a Redis reply
        drops the connection and falls back to the ordinary call (which retries).
        """
        held = _held_connection(client)
        if held is not None:
            try:
                send(held, ("EVALSHA", self.sha, len(keys), *keys, *args))
                return held.read_response()
            except redis.exceptions.NoScriptError:
                pass
            except redis.exceptions.ResponseError:
                raise
            except Exception:
                _drop_connection(client)
        return self(client, keys, args)


_loaded: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def load_scripts(client: Any, scripts: Iterable[Script], *, force: bool = False) -> None:
    """Load ``scripts`` into ``client``'s server: once per client and script unless ``force``."""
    done = _loaded.get(client)
    if done is None:
        done = _loaded[client] = set()
    todo = [script for script in scripts if force or script.sha not in done]
    if not todo:
        return
    pipe = client.pipeline(transaction=False)
    for script in todo:
        pipe.script_load(script.source)
    pipe.execute()
    done.update(script.sha for script in todo)


def run_pipeline(client: Any, scripts: Sequence[Script], build: Callable[[Any], None]) -> list[Any]:
    """Execute a pipeline that ``build`` fills with calls of ``scripts`` (and idempotent
    commands); returns the replies, raising the first error among them.

    After a Redis restart the script cache is empty and every EVALSHA of the pipeline fails
    with NOSCRIPT without running, so loading the scripts and running it again is safe.
    """
    load_scripts(client, scripts)
    replies: list[Any] = []
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        build(pipe)
        replies = pipe.execute(raise_on_error=False)
        missing = any(isinstance(r, redis.exceptions.NoScriptError) for r in replies)
        if not missing:
            break
        if attempt == 1:
            load_scripts(client, scripts, force=True)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return list(replies)


_local = threading.local()


def _packed(conn: Any, words: tuple[Any, ...]) -> list[bytes] | None:
    """``words`` packed as ``conn.send_command`` would pack them, in one C call; None when
    that is not sure to be the same (another packer or encoding, or a word other than text,
    bytes or an int).

    redis-py's packer encodes each word in Python before handing them to hiredis, about 5 µs of
    a publish's ~95 µs of CPU; hiredis encodes text as UTF-8 and ints as their digits itself,
    which is what redis-py's default encoder gives for those.
    """
    if _hiredis_pack is None or type(conn._command_packer) is not HiredisRespSerializer:
        return None
    encoder = conn.encoder
    if encoder.encoding not in _UTF8 or encoder.encoding_errors != "strict":
        return None
    for word in words:
        kind = type(word)
        if kind is not str and kind is not bytes and kind is not int:
            return None
    return [_hiredis_pack(words)]


_UTF8 = frozenset({"utf-8", "utf8", "UTF-8", "UTF8"})


def send(conn: Any, words: Sequence[Any]) -> None:
    """``conn.send_command(*words)``, packed in one C call where that gives the same bytes."""
    words = tuple(words)
    packed = _packed(conn, words)
    if packed is None:
        conn.send_command(*words)
    else:
        conn.send_packed_command(packed)


def _held_connection(client: redis.Redis) -> Any:
    """This thread's own connection to ``client``'s server (per process: safe after fork)."""
    held: tuple[int, weakref.WeakKeyDictionary[redis.Redis, Any]] | None = getattr(
        _local, "connections", None
    )
    if held is None or held[0] != os.getpid():
        held = _local.connections = (os.getpid(), weakref.WeakKeyDictionary())
    conn = held[1].get(client)
    if conn is None:
        try:
            # Checked out of the client's pool and kept: the pool connects it (a Sentinel-managed
            # connection finds its master there) and counts it against max_connections until
            # _drop_connection gives it back.
            conn = client.connection_pool.get_connection()
        except Exception:
            return None
        held[1][client] = conn
    return conn


def _drop_connection(client: redis.Redis) -> None:
    held = getattr(_local, "connections", None)
    if held is not None:
        conn = held[1].pop(client, None)
        if conn is not None:
            conn.disconnect()
            with contextlib.suppress(Exception):  # the pool may be closed or reset by now
                client.connection_pool.release(conn)
