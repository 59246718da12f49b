"""A redis-server of a test's own, for what the shared server must not see: SIGSTOP, a
``maxmemory`` policy, out-of-memory, SCRIPT FLUSH."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from taskyard.testing import terminate, wait_until
from tests import servers


@dataclass
class PrivateRedis:
    process: subprocess.Popen[bytes]
    port: int
    client: redis.Redis

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def freeze(self) -> None:
        """Stop the server (SIGSTOP): connections stay open, nothing answers."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)


@contextmanager
def private_redis(directory: Path, *options: str) -> Iterator[PrivateRedis]:
    """Start ``redis-server`` on a free port with ``options`` (e.g. ``--maxmemory 2mb``)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if servers.in_ci():
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    process = subprocess.Popen(
        [*argv, "no", "--dir", str(directory), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        wait_until(lambda: servers.answers(port), 10, message="private redis-server")
        yield PrivateRedis(process, port, client)
    finally:
        client.close()
        process.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
        terminate(process)
