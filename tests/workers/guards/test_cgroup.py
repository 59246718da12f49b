"""Resource guards: cgroup v2 parsing and discovery on sample files, and the probe choosing
between the cgroup and the host."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskyard.workers.guards import (
    Probe,
)
from taskyard.workers.guards.cgroup import (
    CgroupV2,
    find_v2_mount,
    parse_cpu_max,
    parse_flat_keyed,
    parse_memory_max,
    parse_proc_cgroup,
)
from tests.workers.guards.fakes import DATA


def test_parse_cgroup_files() -> None:
    assert parse_memory_max("max\n") is None
    assert parse_memory_max("1073741824\n") == 1073741824
    assert parse_memory_max("9223372036854771712") is None
    assert parse_cpu_max("max 100000") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cpu_max("50000") == 0.5
    stat = parse_flat_keyed((DATA / "limited/kubepods/pod1/memory.stat").read_text())
    assert stat["inactive_file"] == 268435456 and stat["anon"] == 600000000
    assert parse_proc_cgroup((DATA / "limited.proc_cgroup").read_text()) == "/kubepods/pod1/ctr"
    assert parse_proc_cgroup((DATA / "unlimited.proc_cgroup").read_text()) == "/"
    assert parse_proc_cgroup("4:memory:/x\n") is None
    assert find_v2_mount((DATA / "mounts").read_text()) == Path("/sys/fs/cgroup/unified")
    assert find_v2_mount("proc /proc proc rw 0 0\n") is None


def test_discover_takes_the_tightest_limit_on_the_path() -> None:
    cgroup = CgroupV2.discover(mount=DATA / "limited", relative="/kubepods/pod1/ctr")
    assert cgroup is not None and cgroup.limited
    # The pod's 1 GiB binds, not the container's 2 GiB; the container's 1.5 CPUs bind.
    assert cgroup.memory_dir == DATA / "limited/kubepods/pod1"
    assert cgroup.memory_limit_bytes == 1073741824
    assert cgroup.cpus == 1.5 and cgroup.cpu_dir == DATA / "limited/kubepods/pod1/ctr"
    # Working set: memory.current less inactive_file.
    assert cgroup.memory_used_bytes() == 805306368 - 268435456
    assert cgroup.cpu_usage_s() == pytest.approx(123.456789)


def test_discover_without_limits() -> None:
    cgroup = CgroupV2.discover(mount=DATA / "unlimited", relative="/")
    assert cgroup is not None and not cgroup.limited
    assert cgroup.memory_used_bytes() is None and cgroup.cpu_usage_s() is None


def test_discover_in_a_cgroup_namespace_falls_back_to_the_mount() -> None:
    cgroup = CgroupV2.discover(mount=DATA / "unlimited", relative="/not/visible/here")
    assert cgroup is not None and cgroup.memory_dir is None


def test_probe_uses_the_cgroup_when_it_binds() -> None:
    cgroup = CgroupV2.discover(mount=DATA / "limited", relative="/kubepods/pod1/ctr")
    m = Probe(cgroup=cgroup, exclude_own_cpu=False).measure()
    assert m.memory_source == "cgroup"
    assert m.memory_total_bytes == 1073741824
    assert m.memory_used_bytes == 536870912
    assert m.cpu_busy_s == pytest.approx(123.456789)


def test_probe_uses_the_host_without_a_binding_limit() -> None:
    cgroup = CgroupV2.discover(mount=DATA / "unlimited", relative="/")
    m = Probe(cgroup=cgroup).measure()
    assert m.memory_source == "host" and m.memory_total_bytes > 0
    assert Probe(prefer="host").measure().memory_source == "host"
