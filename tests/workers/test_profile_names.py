"""Worker profiles: an unknown one is refused with every profile there is, `fast` included;
the environment `taskyard worker` starts Celery in."""

from __future__ import annotations

import pytest

from taskyard import ConfigurationError
from taskyard.config import load_settings
from taskyard.workers.profiles import (
    FAST_LOCALS,
    chosen_pool,
    get_profile,
    worker_env_additions,
    worker_environ,
)


def test_an_unknown_profile_lists_every_profile() -> None:
    with pytest.raises(ConfigurationError) as caught:
        get_profile(load_settings(), "nope")
    assert str(caught.value) == (
        "unknown worker profile 'nope'; known profiles: all, batch, critical, default, fast"
    )


@pytest.mark.parametrize(
    ("args", "pool"),
    [
        ((), None),
        (("-A", "app", "worker", "-P", "solo"), "solo"),
        (("--pool", "gevent"), "gevent"),
        (("--pool=eventlet",), "eventlet"),
        (("-Pthreads",), "threads"),
        (("-P", "solo", "-c", "1", "-P", "gevent"), "gevent"),  # the last one wins, as in Celery
    ],
)
def test_the_pool_a_worker_command_line_chooses(args: tuple[str, ...], pool: str | None) -> None:
    assert chosen_pool(args) == pool


def test_workers_get_celerys_fast_locals_except_on_green_pools() -> None:
    base = {"PATH": "/bin"}
    assert worker_environ(("-P", "solo"), base) == {"PATH": "/bin", FAST_LOCALS: "1"}
    assert worker_environ((), base)[FAST_LOCALS] == "1"  # prefork, Celery's default pool
    assert FAST_LOCALS not in worker_environ(("-P", "gevent"), base)
    assert FAST_LOCALS not in worker_environ(("--pool=eventlet",), base)
    # Set already (an empty value turns it off): kept as it is.
    assert worker_environ((), {FAST_LOCALS: ""})[FAST_LOCALS] == ""
    assert base == {"PATH": "/bin"}  # the base is not changed
    # What `taskyard up` adds to each worker's service environment.
    assert worker_env_additions(("-P", "solo"), base) == {FAST_LOCALS: "1"}
    assert worker_env_additions((), {FAST_LOCALS: ""}) == {}
