"""A Redis client of taskyard's stays usable in a child forked while another thread holds any
lock its pool's commands take, as a prefork pool forks a replacement process beside the worker's
reaper and metric threads (taskyard/runtime.py, ``_renew_pool_locks``)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest
import redis

from taskyard.runtime import POOL_LOCKS
from taskyard.runtime import redis_client as make_client
from tests import servers

#: A child blocked on an inherited lock is ended by SIGALRM after this (s): a bound, not a
#: measure (a ping takes milliseconds).
CHILD_BOUND_S = 30
#: Exit codes of the child: its command failed, or it was still blocked at the bound.
FAILED, BLOCKED = 1, 3


@pytest.fixture
def client(redis_client: redis.Redis) -> Iterator[redis.Redis]:
    made = make_client(servers.REDIS_URL)
    made.ping()
    yield made
    made.close()


def fork_while_held(lock: threading.RLock, client: redis.Redis) -> int:
    """Fork while another thread holds ``lock``; the child pings; returns its wait status."""
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            release.wait(CHILD_BOUND_S)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    assert held.wait(CHILD_BOUND_S)
    try:
        pid = os.fork()
        if pid == 0:  # the child: only the forking thread exists here
            code = FAILED
            try:
                signal.signal(signal.SIGALRM, lambda *_: os._exit(BLOCKED))
                signal.alarm(CHILD_BOUND_S)
                if client.ping() and client.incr("fork:child") == 1:
                    code = 0
            finally:
                os._exit(code)
    finally:
        release.set()
        thread.join()
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("name", POOL_LOCKS)
def test_a_child_forked_while_a_thread_holds_a_pool_lock_can_use_the_client(
    client: redis.Redis, name: str
) -> None:
    holder, attribute = POOL_LOCKS[name](client.connection_pool)
    status = fork_while_held(getattr(holder, attribute), client)
    assert os.WIFEXITED(status), status
    code = os.WEXITSTATUS(status)
    assert code != BLOCKED, f"the child was still blocked on the inherited {name}"
    assert code == 0, f"the child's command failed after the fork (ChildDeadlockedError: {name})"
    assert client.get("fork:child") == b"1"  # the child's command reached Redis
    assert client.ping()  # and the parent's pool still works
