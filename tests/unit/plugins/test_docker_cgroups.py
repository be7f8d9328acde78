"""The docker platform's counters from cgroup files, on fake v1 and v2 trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugins.platforms.docker_cgroups import CgroupCounters, HostCgroups

CONTAINER = "ab" * 32
NET_DEV = """Inter-|   Receive                            |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets
    lo:     500       5    0    0    0     0          0         0      500       5    0    0
  eth0:    1462      17    0    0    0     0          0         0      300       3    0    0
  eth1:      38       1    0    0    0     0          0         0       12       1    0    0
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def process(proc: Path, pid: int, cgroup: str) -> None:
    write(proc / str(pid) / "cgroup", cgroup)
    write(proc / str(pid) / "net" / "dev", NET_DEV)


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "cgroup", tmp_path / "proc"


def test_v1_counters_are_read_from_the_cpuacct_and_memory_groups(
    roots: tuple[Path, Path],
) -> None:
    # Given a container's process in v1 groups (a hybrid host: an empty v2 line too)
    cgroups, proc = roots
    group = f"docker/{CONTAINER}"
    process(proc, 42, f"4:memory:/{group}\n2:cpu,cpuacct:/{group}\n0::/{group}\n")
    write(cgroups / "cpu,cpuacct" / group / "cpuacct.usage", "2500000000\n")
    write(cgroups / "memory" / group / "memory.usage_in_bytes", "1000000\n")
    write(cgroups / "memory" / group / "memory.stat", "cache 250000\nrss 700000\n")
    # When they are read
    found = HostCgroups(cgroup_root=cgroups, proc_root=proc).read(CONTAINER, 42)
    # Then CPU, memory without the page cache and every interface's bytes but lo's count
    assert found == CgroupCounters(
        cpu_ns=2_500_000_000, memory_bytes=750_000, rx_bytes=1500, tx_bytes=312
    )


def test_v2_counters_are_read_from_the_unified_group(roots: tuple[Path, Path]) -> None:
    # Given a container's process in a v2 group (systemd driver)
    cgroups, proc = roots
    group = f"system.slice/docker-{CONTAINER}.scope"
    process(proc, 7, f"0::/{group}\n")
    write(cgroups / group / "cpu.stat", "usage_usec 1500\nuser_usec 1000\n")
    write(cgroups / group / "memory.current", "4096\n")
    write(cgroups / group / "memory.stat", "anon 3000\ninactive_file 1000\n")
    # When they are read
    found = HostCgroups(cgroup_root=cgroups, proc_root=proc).read(CONTAINER, 7)
    # Then usage_usec is nanoseconds x 1000 and inactive files are not memory in use
    assert found == CgroupCounters(cpu_ns=1_500_000, memory_bytes=3096, rx_bytes=1500, tx_bytes=312)


def test_a_process_of_another_container_is_never_read(roots: tuple[Path, Path]) -> None:
    # Given a pid whose groups name another container (a recycled pid, another host's pid)
    cgroups, proc = roots
    group = f"docker/{'cd' * 32}"
    process(proc, 42, f"2:cpuacct:/{group}\n4:memory:/{group}\n")
    write(cgroups / "cpuacct" / group / "cpuacct.usage", "1\n")
    reader = HostCgroups(cgroup_root=cgroups, proc_root=proc)
    # When the container's counters are read through it, or through no process at all
    # Then nothing is read: the caller asks the engine
    assert reader.read(CONTAINER, 42) is None
    assert reader.read(CONTAINER, 0) is None
    assert reader.read(CONTAINER, 99) is None


def test_a_group_without_its_files_is_not_read(roots: tuple[Path, Path]) -> None:
    # Given a container's groups whose memory files are not there (not mounted here)
    cgroups, proc = roots
    group = f"docker/{CONTAINER}"
    process(proc, 42, f"2:cpuacct:/{group}\n4:memory:/{group}\n")
    write(cgroups / "cpuacct" / group / "cpuacct.usage", "10\n")
    # When they are read, then nothing is: a half reading is no reading
    assert HostCgroups(cgroup_root=cgroups, proc_root=proc).read(CONTAINER, 42) is None
