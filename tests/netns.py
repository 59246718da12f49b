"""Several hosts on one machine: network namespaces joined to a Redis host by veth pairs.

The Redis host has one link per worker host (a point-to-point /24 each) and one to the test
process (the root namespace), so cutting a worker host's link (``ip link set ... down``) leaves
Redis reachable for everyone else, as a failed switch port or a partitioned machine would.
Needs root and iproute2; :func:`require` skips locally and fails in CI otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from tests import servers


def require() -> None:
    """Skip (locally) or fail (in CI) when namespaces cannot be made here."""
    reason = None
    if shutil.which("ip") is None:
        reason = "iproute2's `ip` is not installed"
    elif os.geteuid() != 0:
        reason = "network namespaces need root"
    if reason is None:
        return
    if servers.in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Hosts:
    """A Redis host and worker hosts; addresses of Redis as each host sees it."""

    prefix: str
    redis_ns: str
    workers: dict[str, str] = field(default_factory=dict)  # worker host -> its namespace
    redis_addr: dict[str, str] = field(default_factory=dict)  # host ("test" too) -> Redis IP
    links: dict[str, str] = field(default_factory=dict)  # worker host -> its link's device

    def exec_prefix(self, host: str) -> list[str]:
        """Command prefix that runs a program on ``host``."""
        return ["ip", "netns", "exec", self.workers.get(host, self.redis_ns)]

    def cut(self, host: str) -> None:
        """Take ``host``'s only link down: it can no longer reach Redis (nor Redis it)."""
        _ip("-n", self.workers[host], "link", "set", self.links[host], "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.workers[host], "link", "set", self.links[host], "up")


@contextmanager
def hosts(worker_hosts: list[str], subnet: int = 77) -> Iterator[Hosts]:
    """Make the namespaces and links; remove them afterwards, whatever happened."""
    prefix = f"ty{os.getpid() % 100000}"
    made = Hosts(prefix=prefix, redis_ns=f"{prefix}-redis")
    namespaces = [made.redis_ns]
    root_links: list[str] = []
    try:
        _ip("netns", "add", made.redis_ns)
        _ip("-n", made.redis_ns, "link", "set", "lo", "up")
        for index, host in enumerate([*worker_hosts, "test"], start=1):
            far, near = f"{prefix}r{index}", f"{prefix}h{index}"
            redis_ip, host_ip = f"10.{subnet}.{index}.1", f"10.{subnet}.{index}.2"
            _ip("link", "add", far, "type", "veth", "peer", "name", near)
            _ip("link", "set", far, "netns", made.redis_ns)
            _ip("-n", made.redis_ns, "addr", "add", f"{redis_ip}/24", "dev", far)
            _ip("-n", made.redis_ns, "link", "set", far, "up")
            if host == "test":
                root_links.append(near)
                _ip("addr", "add", f"{host_ip}/24", "dev", near)
                _ip("link", "set", near, "up")
            else:
                namespace = f"{prefix}-{host}"
                namespaces.append(namespace)
                _ip("netns", "add", namespace)
                _ip("-n", namespace, "link", "set", "lo", "up")
                _ip("link", "set", near, "netns", namespace)
                _ip("-n", namespace, "addr", "add", f"{host_ip}/24", "dev", near)
                _ip("-n", namespace, "link", "set", near, "up")
                made.workers[host] = namespace
                made.links[host] = near
            made.redis_addr[host] = redis_ip
        yield made
    finally:
        for link in root_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10)
        for namespace in namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)
