"""Worker liveness: every process that runs steps proves, every few seconds, that it is alive.

A daemon thread beats every ``heartbeat_interval``: it renews the process's row in
``workers`` and the ``heartbeat_at`` of each step the process is running right
now. The thread dies with its process, and freezes with it, so a step whose
``heartbeat_at`` is older than ``owner_timeout`` belongs to a process that is
dead, frozen or no longer running it: the ledger lets another delivery take
it over (Temporal's activity heartbeat timeout). A slow step on a live process
keeps being renewed and is never taken; its lease still bounds a hung one.

Each process start gets a fresh ``boot_id``, so a recycled pid is never taken
for the process that held a step before it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog
from sqlalchemy import insert, update

from schemas.states import StepStatus
from workers.runtime.db import session_scope
from workers.runtime.models import StepRun, WorkerProcess, utcnow

if TYPE_CHECKING:
    from sqlalchemy import CursorResult, Table

__all__ = ["Heartbeat", "current", "exited", "namespace", "set_node", "stop_current"]

log = structlog.get_logger(__name__)

_workers = cast("Table", WorkerProcess.__table__)
_steps = cast("Table", StepRun.__table__)

#: The Celery node name, set in the worker's main process before the pool forks.
_node: str | None = None
_current: Heartbeat | None = None
_current_lock = threading.Lock()


@functools.cache
def namespace() -> str:
    """Where a pid names one process: this host, its kernel boot and the pid namespace.

    Two containers may share a host name; they never share a pid namespace.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pids = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return f"{socket.gethostname()}/?/?"
    return f"{socket.gethostname()}/{boot}/{pids}"


def exited(pid: int, started_at: dt.datetime) -> bool:
    """Whether process ``pid``, which started beating at ``started_at``, has exited.

    Only meaningful in the process's own :func:`namespace`. A pid taken since by a
    younger process counts as exited; a zombie (killed, not yet reaped) too.
    """
    import psutil  # only takeovers ask: a worker need not import it at boot

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return bool(process.create_time() > started_at.timestamp() + 1.0)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False  # cannot tell: leave it to the heartbeat


def set_node(name: str) -> None:
    """Remember this worker's node name (``w1@host``) for the processes it forks."""
    global _node
    _node = name


class Heartbeat:
    """One process's proof of life, and the set of steps it is running now."""

    def __init__(self, *, database_url: str, interval: float, node: str | None = None) -> None:
        self.boot_id = uuid.uuid4().hex
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.node = node or f"{self.pid}@{self.host}"
        self.namespace = namespace()
        self.interval = interval
        self._url = database_url
        self._held: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the steps this process runs ---------------------------------------------------------

    def holds(self, step_id: int) -> bool:
        """Whether this process is running step ``step_id`` right now."""
        with self._lock:
            return step_id in self._held

    @property
    def held(self) -> set[int]:
        """The ids of the steps this process is running now."""
        with self._lock:
            return set(self._held)

    @contextlib.contextmanager
    def holding(self, step_id: int, label: str) -> Iterator[None]:
        """Renew ``step_id`` with every beat while the block runs."""
        with self._lock:
            self._held[step_id] = label
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(step_id, None)

    # -- beating -------------------------------------------------------------------------------

    def start(self) -> Heartbeat:
        """Write the first beat now, then keep beating on a daemon thread."""
        try:
            self.beat()
        except Exception as exc:
            log.warning("heartbeat_failed", boot_id=self.boot_id, error=str(exc))
        self._thread = threading.Thread(
            target=self._run, name=f"cul8er-heartbeat-{self.pid}", daemon=True
        )
        self._thread.start()
        log.info("heartbeat_started", boot_id=self.boot_id, node=self.node, pid=self.pid)
        return self

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:
                # The database is away: keep trying; the steps look dead meanwhile, which
                # only means another process may run them again once it is back.
                log.warning("heartbeat_failed", boot_id=self.boot_id, error=str(exc))

    def beat(self) -> int:
        """Renew this process's row and its running steps; returns how many steps were renewed."""
        now = utcnow()
        held = self.held
        with session_scope(self._url, durable=False) as session:
            conn = session.connection()
            renewed = cast(
                "CursorResult[Any]",
                conn.execute(
                    update(_workers)
                    .where(_workers.c.boot_id == self.boot_id)
                    .values(beat_at=now, lost_at=None)
                ),
            )
            if not renewed.rowcount:
                conn.execute(
                    insert(_workers).values(
                        boot_id=self.boot_id,
                        node=self.node,
                        host=self.host,
                        pid=self.pid,
                        namespace=self.namespace,
                        started_at=now,
                        beat_at=now,
                    )
                )
            if not held:
                return 0
            renewed_ids = set(
                conn.execute(
                    update(_steps)
                    .where(
                        _steps.c.id.in_(held),
                        _steps.c.owner_id == self.boot_id,
                        _steps.c.status == StepStatus.RUNNING,
                    )
                    .values(heartbeat_at=now)
                    .returning(_steps.c.id)
                ).scalars()
            )
        # A step that finished between the snapshot of ``held`` and the renewal is no longer
        # held now; one still held but not renewed was taken over.
        lost = (set(held) - renewed_ids) & self.held
        if lost:
            # Frozen past the owner timeout, then woken: another process took the step
            # over. This process finishes its body, and the ledger refuses its completion.
            log.warning("step_ownership_lost", boot_id=self.boot_id, held=len(lost))
        return len(renewed_ids)

    def stop(self) -> None:
        """Stop beating and mark the process stopped (a clean exit holds nothing)."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 1)
        with contextlib.suppress(Exception), session_scope(self._url) as session:
            session.execute(
                update(_workers)
                .where(_workers.c.boot_id == self.boot_id)
                .values(stopped_at=utcnow())
            )


def current(*, database_url: str, interval: float) -> Heartbeat:
    """This process's heartbeat, started on first use (and again in a forked child)."""
    global _current
    beat = _current
    if beat is not None and beat.pid == os.getpid():
        return beat
    with _current_lock:
        if _current is None or _current.pid != os.getpid():
            _current = Heartbeat(database_url=database_url, interval=interval, node=_node).start()
        return _current


def stop_current() -> None:
    """Stop this process's heartbeat, if it has one."""
    global _current
    with _current_lock:
        beat, _current = _current, None
    if beat is not None and beat.pid == os.getpid():
        beat.stop()
