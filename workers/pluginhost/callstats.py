"""Per (plugin, version, tenant) call outcomes and latencies: what plugin deployments gate on.

Every plugin call this process runs is counted in memory (a lock and a dict update, no I/O on
the call's path); a daemon thread adds the counts to ``plugin_call_stats`` every
``CUL8ER_PLUGIN_STATS_FLUSH`` seconds, one row per time window of
``CUL8ER_PLUGIN_STATS_WINDOW`` seconds, by an upsert that adds to what other processes wrote.
A process that dies loses at most its last unflushed second of counts: gates read rates, and
a rate over a few seconds more or less is the same rate.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import case, select
from sqlalchemy.dialects import postgresql, sqlite

from workers.runtime.db import session_scope
from workers.runtime.errors import TransientError
from workers.runtime.models import PluginCallStat
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["CallStats", "Tally", "flush", "read", "record"]

log = structlog.get_logger(__name__)


@dataclass
class Tally:
    """Calls, errors and latency moments of one key in one window."""

    calls: int = 0
    errors: int = 0
    latency_ms_sum: float = 0.0
    latency_ms_sq: float = 0.0
    latency_ms_max: float = 0.0

    def add(self, ok: bool, latency_ms: float) -> None:
        """Count one call."""
        self.calls += 1
        self.errors += 0 if ok else 1
        self.latency_ms_sum += latency_ms
        self.latency_ms_sq += latency_ms * latency_ms
        self.latency_ms_max = max(self.latency_ms_max, latency_ms)

    def merge(self, other: Tally) -> None:
        """Add ``other``'s counts to these."""
        self.calls += other.calls
        self.errors += other.errors
        self.latency_ms_sum += other.latency_ms_sum
        self.latency_ms_sq += other.latency_ms_sq
        self.latency_ms_max = max(self.latency_ms_max, other.latency_ms_max)

    @property
    def error_rate(self) -> float:
        """Errors per call (0 with no calls)."""
        return self.errors / self.calls if self.calls else 0.0

    @property
    def latency_ms_avg(self) -> float:
        """Mean latency (0 with no calls)."""
        return self.latency_ms_sum / self.calls if self.calls else 0.0

    @property
    def latency_ms_sd(self) -> float:
        """Sample standard deviation of the latency (0 with fewer than two calls)."""
        if self.calls < 2:
            return 0.0
        mean = self.latency_ms_avg
        variance = (self.latency_ms_sq - self.calls * mean * mean) / (self.calls - 1)
        return math.sqrt(max(0.0, variance))


#: (plugin, version, tenant id or "", window start).
_Key = tuple[str, str, str, dt.datetime]


class CallStats:
    """Counts of this process, flushed to the table by a daemon thread."""

    def __init__(self, *, window: float, every: float) -> None:
        self.window = window
        self.every = every
        self._pending: dict[_Key, Tally] = {}
        self._lock = threading.Lock()
        self._thread: tuple[int, threading.Thread] | None = None

    def record(
        self, plugin: str, version: str, tenant_id: str | None, *, ok: bool, ms: float
    ) -> None:
        """Count one call (no I/O: the flush thread writes)."""
        now = time.time()
        start = dt.datetime.fromtimestamp(now - now % self.window, dt.UTC)
        key = (plugin, version, tenant_id or "", start)
        with self._lock:
            self._pending.setdefault(key, Tally()).add(ok, ms)
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        # After a fork (prefork pool) the parent's thread does not run in the child.
        if self._thread is not None and self._thread[0] == os.getpid():
            return
        thread = threading.Thread(target=self._loop, name="cul8er-callstats", daemon=True)
        self._thread = (os.getpid(), thread)
        thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.every)
            try:
                self.flush()
            except Exception:  # the thread must outlive a bad moment of the database
                log.warning("plugin_call_stats_flush_failed", exc_info=True)

    def flush(self) -> int:
        """Write what was counted since the last flush; the number of rows touched."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        try:
            with session_scope(durable=False) as session:
                # One order in every process: two flushes never wait on each other's rows.
                for key in sorted(pending):
                    _upsert(session, key, pending[key])
        except TransientError:
            with self._lock:  # put them back: the next flush tries again
                for key, tally in pending.items():
                    self._pending.setdefault(key, Tally()).merge(tally)
            raise
        return len(pending)


def _upsert(session: Session, key: _Key, tally: Tally) -> None:
    plugin, version, tenant_id, start = key
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    columns = PluginCallStat.__table__.c
    statement = insert(PluginCallStat).values(
        plugin=plugin,
        version=version,
        tenant_id=tenant_id,
        window_start=start,
        calls=tally.calls,
        errors=tally.errors,
        latency_ms_sum=tally.latency_ms_sum,
        latency_ms_sq=tally.latency_ms_sq,
        latency_ms_max=tally.latency_ms_max,
    )
    new = statement.excluded
    statement = statement.on_conflict_do_update(
        index_elements=["plugin", "version", "tenant_id", "window_start"],
        set_={
            "calls": columns.calls + new.calls,
            "errors": columns.errors + new.errors,
            "latency_ms_sum": columns.latency_ms_sum + new.latency_ms_sum,
            "latency_ms_sq": columns.latency_ms_sq + new.latency_ms_sq,
            "latency_ms_max": case(
                (new.latency_ms_max > columns.latency_ms_max, new.latency_ms_max),
                else_=columns.latency_ms_max,
            ),
        },
    )
    session.execute(statement)


_stats: CallStats | None = None


def _current() -> CallStats:
    global _stats
    if _stats is None:
        settings = get_settings()
        _stats = CallStats(window=settings.plugin_stats_window, every=settings.plugin_stats_flush)
    return _stats


def record(plugin: str, version: str, tenant_id: str | None, *, ok: bool, ms: float) -> None:
    """Count one call of ``plugin`` ``version`` for ``tenant_id`` in this process."""
    _current().record(plugin, version, tenant_id, ok=ok, ms=ms)


def flush() -> int:
    """Write this process's counts now (a worker shutting down, a test)."""
    return _current().flush() if _stats is not None else 0


def read(
    session: Session, plugin: str, version: str, tenants: list[str] | None, since: dt.datetime
) -> dict[str, Tally]:
    """Per tenant: ``version``'s calls since ``since`` (``tenants``: only those)."""
    window = get_settings().plugin_stats_window
    query = select(PluginCallStat).where(
        PluginCallStat.plugin == plugin,
        PluginCallStat.version == version,
        # The window that holds ``since`` counts whole: at most one window of earlier calls.
        PluginCallStat.window_start >= since - dt.timedelta(seconds=window),
    )
    if tenants is not None:
        query = query.where(PluginCallStat.tenant_id.in_(tenants))
    found: dict[str, Tally] = {}
    for row in session.scalars(query):
        found.setdefault(row.tenant_id, Tally()).merge(
            Tally(
                calls=row.calls,
                errors=row.errors,
                latency_ms_sum=row.latency_ms_sum,
                latency_ms_sq=row.latency_ms_sq,
                latency_ms_max=row.latency_ms_max,
            )
        )
    return found
