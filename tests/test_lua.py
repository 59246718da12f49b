"""The one Lua runner (``taskyard.lua``) on a real Redis: every way of calling a script."""

from __future__ import annotations

import importlib
import pkgutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.transport.redis import PrefixedStrictRedis

from taskyard import lua
from taskyard.lua import Fragment, Script
from tests import servers

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "taskyard"

#: Sets KEYS[1] to ARGV[1] and returns every key it was given, as the server saw them.
_ECHO = "redis.call('SET', KEYS[1], ARGV[1])\nreturn KEYS\n"


def fresh(body: str = _ECHO) -> Script:
    """A script this server has never seen (a unique comment gives it a unique SHA), so the
    first call meets NOSCRIPT without flushing the shared server's script cache."""
    return Script(f"-- {uuid.uuid4()}\n{body}")


def test_every_script_file_of_the_package_is_loaded_by_some_script() -> None:
    """No ``.lua`` file lies unused beside the code, and every script compiles on the server."""
    import taskyard

    scripts: list[Script] = []
    for info in pkgutil.walk_packages(taskyard.__path__, "taskyard."):
        if not info.name.endswith(".__main__"):
            module = importlib.import_module(info.name)
            scripts += [value for value in vars(module).values() if isinstance(value, Script)]
    sources = "\n".join(script.source for script in scripts)
    files = sorted(PACKAGE.rglob("*.lua"))
    assert files
    for path in files:
        assert f"-- {path.name}\n" in sources or f"/{path.name}\n" in sources, path
    servers.require("redis")
    client = redis.Redis.from_url(servers.REDIS_URL)
    try:
        for script in scripts:
            script.load(client)  # a syntax error fails here
    finally:
        client.close()


def test_fragments_are_joined_in_the_order_given_wildcards_in_name_order(tmp_path: Path) -> None:
    parts = lua.fragments("taskyard.broker", "ack.lua")
    assert [p.name for p in parts] == ["ack.lua"]
    assert lua.fragments("taskyard.broker", "no-such-folder/*.lua") == []
    with pytest.raises(FileNotFoundError):
        lua.fragments("taskyard.broker", "no-such-file.lua")
    script = Script.join([Fragment("b", "local b = 2"), Fragment("a", "return b")])
    assert script.source == "-- b\nlocal b = 2\n-- a\nreturn b\n"
    assert script.name == "a"
    with pytest.raises(ValueError):
        Script.join([])


def test_a_plain_client_call_reloads_after_noscript(redis_client: redis.Redis) -> None:
    script = fresh()
    assert redis_client.script_exists(script.sha) == [False]
    assert script(redis_client, ("k",), ("v",)) == [b"k"]
    assert redis_client.get("k") == b"v"
    assert redis_client.script_exists(script.sha) == [True]
    assert script(redis_client, ("k",), ("w",)) == [b"k"]
    assert redis_client.get("k") == b"w"


def test_kombus_prefixing_client_leaves_full_keys_alone(redis_client: redis.Redis) -> None:
    pool = redis.ConnectionPool.from_url(servers.REDIS_URL)
    prefixed = PrefixedStrictRedis(connection_pool=pool, global_keyprefix="pre:")
    try:
        script = fresh()
        assert script(prefixed, ("pre:a", "pre:b"), ("v",)) == [b"pre:a", b"pre:b"]
        assert redis_client.get("pre:a") == b"v"
        assert redis_client.get("pre:pre:a") is None
        # Inside the prefixing client's own pipeline too.
        lua.run_pipeline(prefixed, [script], lambda pipe: script.queue(pipe, ("pre:c",), ("x",)))
        assert redis_client.get("pre:c") == b"x"
    finally:
        pool.disconnect()


def test_a_pipeline_runs_again_when_the_server_lost_its_scripts(
    redis_client: redis.Redis,
) -> None:
    script = fresh("return redis.call('INCR', KEYS[1])")
    # Recorded as loaded but absent on the server: what a Redis restart leaves behind. A
    # pipeline of EVALSHA fails whole with NOSCRIPT (nothing ran), so it is sent again.
    lua.load_scripts(redis_client, [])
    lua._loaded[redis_client].add(script.sha)

    def build(pipe: redis.client.Pipeline) -> None:
        script.queue(pipe, ("n",), ())
        script.queue(pipe, ("n",), ())

    assert lua.run_pipeline(redis_client, [script], build) == [1, 2]
    assert redis_client.get("n") == b"2"
    failing = fresh("return redis.error_reply('boom')")
    with pytest.raises(redis.ResponseError, match="boom"):
        lua.run_pipeline(redis_client, [failing], lambda pipe: failing.queue(pipe, (), ()))


def test_command_words_sent_on_a_connection_without_waiting(redis_client: redis.Redis) -> None:
    script = fresh()
    script.load(redis_client)
    connection: Any = redis_client.connection_pool.get_connection()
    try:
        connection.send_command(*script.command(("k",), ("sent",)))
        assert connection.read_response() == [b"k"]
    finally:
        redis_client.connection_pool.release(connection)
    assert redis_client.get("k") == b"sent"


def test_a_dropped_held_connection_goes_back_to_its_pool(redis_client: redis.Redis) -> None:
    """The held connection counts against the pool's max_connections while held; dropped (as
    after a broken connection), it is given back, so the pool does not run dry."""
    kwargs = redis_client.connection_pool.connection_kwargs
    client = redis.Redis(
        host=kwargs["host"], port=kwargs["port"], db=kwargs["db"], max_connections=1
    )
    try:
        script = fresh()
        script.load(redis_client)  # no NOSCRIPT: its fallback would need a second connection
        assert script.fast(client, ("k",), ("1",)) == [b"k"]
        with pytest.raises(redis.exceptions.ConnectionError, match="Too many connections"):
            client.get("k")  # the only connection is held
        lua._drop_connection(client)
        assert client.get("k") == b"1"
        assert script.fast(client, ("k",), ("2",)) == [b"k"]  # held again, once free
    finally:
        lua._drop_connection(client)
        client.close()


def test_the_held_connection_path_matches_the_ordinary_call(redis_client: redis.Redis) -> None:
    script = fresh()
    assert script.fast(redis_client, ("k",), ("1",)) == [b"k"]  # NOSCRIPT, then reloaded
    assert script.fast(redis_client, ("k",), ("2",)) == [b"k"]
    assert redis_client.get("k") == b"2"
    with pytest.raises(redis.ResponseError, match="boom"):
        failing = fresh("return redis.error_reply('boom')")
        failing.load(redis_client)
        failing.fast(redis_client, (), ())


def test_the_held_connection_packs_commands_as_redis_py_does(redis_client: redis.Redis) -> None:
    conn = redis_client.connection_pool.get_connection()
    try:
        words = ("EVALSHA", "a" * 40, 2, "k:é", b"\x00\xff", "caf\u00e9 \u2603 message", 100, 0, -7)
        packed = lua._packed(conn, words)
        assert packed is not None
        assert b"".join(packed) == b"".join(conn._command_packer.pack(*words))
        # Anything redis-py's encoder treats otherwise goes through redis-py's own packer.
        for odd in (True, 1.5, None, bytearray(b"x"), memoryview(b"x")):
            assert lua._packed(conn, ("EVALSHA", "a" * 40, 0, odd)) is None
    finally:
        redis_client.connection_pool.release(conn)
    latin = redis.Redis(connection_pool=redis.ConnectionPool(encoding="latin-1"))
    try:
        other = latin.connection_pool.make_connection()
        assert lua._packed(other, ("GET", "k")) is None
    finally:
        latin.close()
