"""Linux control groups for local instances: v1 (separate cpu and memory trees) or v2."""

from __future__ import annotations

import errno
import functools
from pathlib import Path
from typing import Final

import structlog

from workers.plugin_api import wait_until

__all__ = ["CFS_PERIOD_US", "CGROUP_PARENT", "Cgroups"]

log = structlog.get_logger(__name__)

#: The cgroup folder holding one group per instance.
CGROUP_PARENT: Final = "cul8er"
#: The CFS period for CPU quotas (microseconds).
CFS_PERIOD_US: Final = 100_000
#: How often to look again while a group is still busy (seconds).
POLL_SECONDS: Final = 0.05
#: How long a busy group may take to empty before it is left behind (seconds).
BUSY_SECONDS: Final = 2.0


class Cgroups:
    """One instance's cgroups: v2, v1 (separate ``cpu`` and ``memory`` trees), or none."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._mode: str | None = None

    @property
    def mode(self) -> str:
        """``cgroup-v2``, ``cgroup-v1``, or ``none`` when cgroups are not writable here."""
        if self._mode is None:
            self._mode = self._detect()
        return self._mode

    def _detect(self) -> str:
        try:
            if (self.root / "cgroup.controllers").exists():
                parent = self.root / CGROUP_PARENT
                parent.mkdir(exist_ok=True)
                for folder in (self.root, parent):
                    (folder / "cgroup.subtree_control").write_text("+cpu +memory")
                enabled = (parent / "cgroup.subtree_control").read_text().split()
                if {"cpu", "memory"} <= set(enabled):
                    return "cgroup-v2"
            elif (self.root / "cpu" / "cpu.cfs_quota_us").exists() and (
                self.root / "memory" / "memory.limit_in_bytes"
            ).exists():
                for tree in ("cpu", "memory"):
                    (self.root / tree / CGROUP_PARENT).mkdir(exist_ok=True)
                return "cgroup-v1"
        except OSError as exc:
            log.warning("cgroups_not_writable", root=str(self.root), error=str(exc))
        return "none"

    def dirs(self, name: str) -> list[Path]:
        """The instance's cgroup folders (none without cgroups)."""
        if self.mode == "cgroup-v2":
            return [self.root / CGROUP_PARENT / name]
        if self.mode == "cgroup-v1":
            return [self.root / tree / CGROUP_PARENT / name for tree in ("cpu", "memory")]
        return []

    def apply(self, name: str, *, cpu_quota_us: int | None, memory_bytes: int | None) -> None:
        """Create the instance's cgroups and write its CPU quota and memory limit."""
        for directory in self.dirs(name):
            directory.mkdir(parents=True, exist_ok=True)
        if self.mode == "cgroup-v2":
            group = self.root / CGROUP_PARENT / name
            quota = "max" if cpu_quota_us is None else str(cpu_quota_us)
            (group / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
            (group / "memory.max").write_text("max" if memory_bytes is None else str(memory_bytes))
        elif self.mode == "cgroup-v1":
            cpu, memory = self.dirs(name)
            (cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(-1 if cpu_quota_us is None else cpu_quota_us))
            limit = -1 if memory_bytes is None else memory_bytes
            (memory / "memory.limit_in_bytes").write_text(str(limit))

    def procs_files(self, name: str) -> list[Path]:
        """The ``cgroup.procs`` files a process writes its pid to, to join the instance."""
        return [directory / "cgroup.procs" for directory in self.dirs(name)]

    def join(self, name: str, pid: int) -> None:
        """Move ``pid`` into the instance's cgroups."""
        for procs in self.procs_files(name):
            procs.write_text(str(pid))

    def remove(self, name: str) -> None:
        """Remove the instance's cgroups; a group still busy after a moment is left, and logged."""
        for directory in self.dirs(name):
            try:
                wait_until(
                    functools.partial(_rmdir, directory),
                    timeout=BUSY_SECONDS,
                    interval=POLL_SECONDS,
                    message=f"cgroup {directory} still busy",
                )
            except OSError as exc:  # a TimeoutError too: the group stayed busy
                log.warning("cgroup_not_removed", path=str(directory), error=str(exc))


def _rmdir(directory: Path) -> bool:
    """Remove an empty cgroup: whether it is gone; ``False`` while it is busy.

    Exiting tasks leave the group a moment after SIGKILL (``EBUSY`` until then).
    """
    try:
        directory.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        return False
    return True
