"""Worker and beat processes for the throughput and burst benches, in a data dir they are given.

Like ``bench._harness.workers`` but the caller owns the data dir (the embedded broker
lives there) and may add settings, run beat, and read the worker's pids for a profiler.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The queues a bench worker consumes.
QUEUES = "lifecycle,metering,health,celery"


@dataclass
class Procs:
    """The processes started for one bench stack."""

    data_dir: Path
    worker_name: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def worker_pid(self) -> int:
        """The pid of the worker's main process (its pool children are below it)."""
        return self.processes[0].pid


def bench_env(data_dir: Path, extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without ``CUL8ER_*``, plus the data dir and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
    env.update(CUL8ER_DATA_DIR=str(data_dir), CUL8ER_LOG_LEVEL="WARNING", **extra)
    return env


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app", *args],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=open(log, "ab"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
    )


@contextlib.contextmanager
def started(
    data_dir: Path, extra: dict[str, str], *, concurrency: int = 2, beat: bool = False
) -> Iterator[Procs]:
    """A real ``celery worker`` (and beat) on ``data_dir`` with settings ``extra``."""
    env = bench_env(data_dir, extra)
    name = f"bench-{uuid.uuid4().hex[:6]}"
    worker = [
        "worker",
        "-Q",
        QUEUES,
        "-c",
        str(concurrency),
        "--without-mingle",
        "--without-gossip",
        "-l",
        "WARNING",
        "-n",
        f"{name}@%h",
    ]
    procs = Procs(data_dir=data_dir, worker_name=name)
    procs.processes.append(_spawn(worker, env, data_dir / "worker.log"))
    if beat:
        schedule = str(data_dir / f"beat-{name}")
        procs.processes.append(
            _spawn(["beat", "-s", schedule, "-l", "WARNING"], env, data_dir / "beat.log")
        )
    try:
        yield procs
    finally:
        for proc in procs.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
