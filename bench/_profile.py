"""Sample a Celery worker's pool processes with py-spy and split the samples: platform or cul8er.

``py-spy`` (``.venv/bin/pip install py-spy``) records each pool process in raw (collapsed)
form, wall time with idle threads included, so a task waiting on a platform call counts
there. Only the pool processes' main threads are counted: that is where tasks run.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

#: Samples per second per process.
RATE = 97
#: A frame is the platform's when it is a method of the platform's class.
PLATFORM_FRAME = re.compile(r"^LocalPlatform\.(\w+) ")
#: The provisioner method that made a platform call.
PROVISIONER_FRAME = re.compile(r"^\w+Per\w+\.\w+ |^SharedCluster\.\w+ ")
#: A sample is inside a task when Celery's tracer is on its stack.
TASK_FRAME = "trace_task ("
#: Frames of cul8er's task and plugin modules.
OWN_TASK_FRAME = re.compile(r"\((tasks|plugins)/")
#: Frames of any cul8er module.
CUL8ER_FRAME = re.compile(r"\((tasks|plugins|workers|schemas)/")
#: Frames listed per table.
TOP = 25


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    """``with Profiler(worker_pid, folder):`` records every pool process of the worker."""

    def __init__(self, worker_pid: int, folder: Path, *, enabled: bool = True) -> None:
        self.worker_pid = worker_pid
        self.folder = folder
        self.enabled = enabled and _py_spy() is not None
        self.outputs: list[Path] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Profiler:
        if not self.enabled:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 30
        children: list[psutil.Process] = []
        while len(children) < 2 and time.monotonic() < deadline:
            children = psutil.Process(self.worker_pid).children()
            time.sleep(0.2)
        for child in children:
            out = self.folder / f"pool-{child.pid}.raw"
            command = [_py_spy() or "py-spy", "record", "--pid", str(child.pid), "--format"]
            command += ["raw", "-o", str(out), "--idle", "--threads", "--nonblocking"]
            command += ["--rate", str(RATE)]
            log = open(self.folder / f"py-spy-{child.pid}.log", "ab")  # noqa: SIM115
            self._procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            self.outputs.append(out)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in self._procs:
            proc.send_signal(signal.SIGINT)
        for proc in self._procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _function(frame: str) -> str:
    """``name (file.py:12)`` → ``name (file.py)``."""
    return re.sub(r":\d+\)$", ")", frame)


def read_samples(outputs: list[Path]) -> list[tuple[list[str], int]]:
    """The main-thread stacks (root first) and their sample counts."""
    stacks = []
    for path in outputs:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            if not count.isdigit() or not frames or "MainThread" not in frames[0]:
                continue
            stacks.append((frames[1:], int(count)))
    return stacks


def _where(frames: list[str]) -> str:
    """The innermost task or plugin function on a cul8er stack, else its innermost cul8er one."""
    for pattern in (OWN_TASK_FRAME, CUL8ER_FRAME):
        found = [frame for frame in frames if pattern.search(frame)]
        if found:
            return _function(found[-1])
    return "other (celery, kombu)"


def _top(counter: collections.Counter[str]) -> dict[str, int]:
    return dict(counter.most_common(TOP))


def split_samples(outputs: list[Path]) -> dict[str, Any]:
    """Task samples split: the platform's (by method and caller) and cul8er's (top frames)."""
    total = in_task = platform = create = 0
    methods: collections.Counter[str] = collections.Counter()
    callers: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    where: collections.Counter[str] = collections.Counter()
    for frames, count in read_samples(outputs):
        total += count
        if not any(TASK_FRAME in frame for frame in frames):
            continue
        in_task += count
        hit = next((i for i, f in enumerate(frames) if PLATFORM_FRAME.match(f)), None)
        if hit is not None:
            platform += count
            method = _function(frames[hit])
            methods[method] += count
            caller = next(
                (_function(f) for f in frames[:hit] if PROVISIONER_FRAME.match(f)),
                _function(frames[hit - 1]) if hit else "?",
            )
            callers[f"{caller} -> {method}"] += count
            if method.startswith("LocalPlatform.create_instance "):
                create += count
            continue
        below = frames[next(i for i, f in enumerate(frames) if TASK_FRAME in f) + 1 :]
        for function in {_function(frame) for frame in below}:
            inclusive[function] += count
        own[_function(frames[-1])] += count
        where[_where(below)] += count
    cul8er = in_task - platform
    return {
        "samples_main_thread": total,
        "samples_in_tasks": in_task,
        "samples_platform": platform,
        "samples_cul8er": cul8er,
        "samples_platform_create": create,
        "cul8er_share_of_task_time": round(cul8er / in_task, 3) if in_task else None,
        # What is not the platform's own create: cul8er, and the other platform calls it makes.
        "not_create_share_of_task_time": round(1 - create / in_task, 3) if in_task else None,
        "platform_by_method": _top(methods),
        "platform_by_caller": _top(callers),
        "cul8er_by_place": _top(where),
        "cul8er_top_inclusive": _top(inclusive),
        "cul8er_top_self": _top(own),
    }
