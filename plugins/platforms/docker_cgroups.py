"""A container's counters read from this host's cgroup and ``/proc`` files.

The engine's ``stats`` answers once its collector has taken its next sample (about a
second, even with ``one-shot``); when the engine runs on this host, the same counters are
in the files it reads them from. The container's main process names its groups in
``/proc/<pid>/cgroup``; they are used only if they carry the container's id, so a pid of
another namespace or a recycled pid is never read as the container's.

==================  =====================================  ==================================
counter             cgroup v1                              cgroup v2
==================  =====================================  ==================================
CPU (ns)            ``cpuacct.usage``                      ``cpu.stat`` ``usage_usec`` x 1000
memory (bytes)      ``memory.usage_in_bytes`` - ``cache``  ``memory.current`` -
                                                           ``inactive_file``
network (bytes)     ``/proc/<pid>/net/dev``, every interface but ``lo`` (as the engine)
==================  =====================================  ==================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["CgroupCounters", "HostCgroups"]

#: Where cgroup file systems are mounted, and where processes are listed.
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
PROC_ROOT: Final = Path("/proc")


@dataclass(frozen=True)
class CgroupCounters:
    """What the engine's ``stats`` would report, read from the files."""

    cpu_ns: int
    memory_bytes: int
    rx_bytes: int
    tx_bytes: int


def _stat_value(text: str, key: str) -> int:
    """The value of ``key`` in a ``memory.stat``/``cpu.stat`` text (0 when absent)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _net_bytes(text: str) -> tuple[int, int]:
    """Received and sent bytes over every interface of a ``net/dev`` text but loopback."""
    rx = tx = 0
    for line in text.splitlines()[2:]:
        name, _, fields = line.partition(":")
        values = fields.split()
        if name.strip() == "lo" or len(values) < 9:
            continue
        rx += int(values[0])
        tx += int(values[8])
    return rx, tx


class HostCgroups:
    """Reads containers' counters from this host's files (v1 or v2), or says it cannot."""

    def __init__(self, *, cgroup_root: Path = CGROUP_ROOT, proc_root: Path = PROC_ROOT) -> None:
        self.cgroup_root = cgroup_root
        self.proc_root = proc_root

    def groups(self, container_id: str, pid: int) -> dict[str, Path] | None:
        """The container's group folder per controller (``""``: the v2 group), or ``None``
        when the process is not visible here or is not the container's."""
        if pid <= 0 or not container_id:
            return None
        try:
            text = (self.proc_root / str(pid) / "cgroup").read_text()
        except OSError:
            return None
        found: dict[str, Path] = {}
        for line in text.splitlines():
            _, controllers, path = line.split(":", 2)
            if container_id not in path:
                continue
            relative = path.lstrip("/")
            if not controllers:
                found[""] = self.cgroup_root / relative
            for controller in controllers.split(","):
                if controller:
                    # A v1 mount is named after its controllers (``cpu,cpuacct``), and
                    # usually linked under each one's own name too.
                    mount = self.cgroup_root / controllers
                    if not mount.exists():
                        mount = self.cgroup_root / controller
                    found[controller] = mount / relative
        return found or None

    def read(self, container_id: str, pid: int) -> CgroupCounters | None:
        """The container's counters now, or ``None`` when they cannot be read here."""
        groups = self.groups(container_id, pid)
        if groups is None:
            return None
        try:
            cpu_ns, memory = self._cpu_memory(groups)
            rx, tx = _net_bytes((self.proc_root / str(pid) / "net" / "dev").read_text())
        except (OSError, ValueError):
            return None
        if cpu_ns is None or memory is None:
            return None
        return CgroupCounters(cpu_ns=cpu_ns, memory_bytes=memory, rx_bytes=rx, tx_bytes=tx)

    @staticmethod
    def _cpu_memory(groups: dict[str, Path]) -> tuple[int | None, int | None]:
        """CPU nanoseconds and memory without page cache, from v1 groups or the v2 one."""
        cpu: int | None = None
        memory: int | None = None
        cpuacct = groups.get("cpuacct")
        if cpuacct is not None and (cpuacct / "cpuacct.usage").exists():
            cpu = int((cpuacct / "cpuacct.usage").read_text())
        elif "" in groups and (groups[""] / "cpu.stat").exists():
            cpu = _stat_value((groups[""] / "cpu.stat").read_text(), "usage_usec") * 1000
        group = groups.get("memory")
        if group is not None and (group / "memory.usage_in_bytes").exists():
            used = int((group / "memory.usage_in_bytes").read_text())
            cache = _stat_value((group / "memory.stat").read_text(), "cache")
            memory = max(0, used - cache)
        elif "" in groups and (groups[""] / "memory.current").exists():
            used = int((groups[""] / "memory.current").read_text())
            cache = _stat_value((groups[""] / "memory.stat").read_text(), "inactive_file")
            memory = max(0, used - cache)
        return cpu, memory
