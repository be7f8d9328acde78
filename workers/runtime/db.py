"""Engines and sessions: one engine per process, one session (one transaction) per unit of work."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from workers.runtime.errors import TransientError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

__all__ = ["dispose_engines", "get_engine", "session_scope", "statement_scope"]

#: How long SQLite waits for a writer lock before reporting "database is locked" (ms).
SQLITE_BUSY_TIMEOUT_MS = 30_000

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}
_makers: dict[tuple[int, str], sessionmaker[Session]] = {}
#: PostgreSQL only: pools whose every statement commits on its own, without waiting for the
#: WAL flush (see :func:`statement_scope`).
_statement_engines: dict[tuple[int, str], Engine] = {}


def _configure_sqlite(engine: Engine) -> None:
    """WAL, a busy timeout, and transactions that take the write lock at BEGIN.

    Several worker processes write at once. With SQLite's default deferred
    transactions two writers can each hold a read lock and deadlock on the
    upgrade (busy_timeout cannot help there), so every transaction starts with
    ``BEGIN IMMEDIATE``; readers are never blocked under WAL.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def get_engine(url: str) -> Engine:
    """The engine for ``url`` in this process (a forked child gets its own)."""
    key = (os.getpid(), url)
    engine = _engines.get(key)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            if url.startswith("sqlite"):
                path = url.split("///", 1)[-1]
                if path and path != ":memory:":
                    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
                _configure_sqlite(engine)
            else:
                # No pre-ping: it costs a round trip per transaction on the ledger's hot
                # path; a dropped connection raises OperationalError → TransientError → retry.
                engine = create_engine(url, pool_size=5, max_overflow=5, pool_recycle=1800)
            _engines[key] = engine
            _makers[key] = sessionmaker(engine, expire_on_commit=False)
    return engine


def _statement_engine(url: str) -> Engine:
    """An autocommit pool of ``url`` whose commits skip the WAL flush wait (PostgreSQL)."""
    key = (os.getpid(), url)
    engine = _statement_engines.get(key)
    if engine is not None:
        return engine
    with _lock:
        engine = _statement_engines.get(key)
        if engine is None:
            engine = _statement_engines[key] = create_engine(
                url,
                pool_size=5,
                max_overflow=5,
                pool_recycle=1800,
                isolation_level="AUTOCOMMIT",
                connect_args={"options": "-c synchronous_commit=off"},
            )
    return engine


def dispose_engines() -> None:
    """Forget engines inherited from a parent process without closing its connections."""
    for (pid, _url), engine in list(_engines.items()):
        if pid != os.getpid():
            engine.dispose(close=False)
            del _engines[(pid, _url)]
            _makers.pop((pid, _url), None)
    for (pid, _url), engine in list(_statement_engines.items()):
        if pid != os.getpid():
            engine.dispose(close=False)
            del _statement_engines[(pid, _url)]


@contextmanager
def session_scope(url: str | None = None, *, durable: bool = True) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error.

    A lost or locked database surfaces as ``TransientError`` so the step retries.

    ``durable=False`` is for bookkeeping that may be lost in a database crash (heartbeats,
    call tallies): on PostgreSQL the commit does not wait for the WAL flush. A crash of the
    database server can then forget the last few hundred milliseconds of those records,
    never half of one.
    """
    if url is None:
        from workers.runtime.settings import get_settings

        url = get_settings().sqlalchemy_url
    get_engine(url)
    session = _makers[(os.getpid(), url)]()
    with _guarded(session):
        if not durable and url.startswith("postgresql"):
            session.execute(text("SET LOCAL synchronous_commit TO OFF"))
        yield session


@contextmanager
def statement_scope(url: str | None = None) -> Iterator[Connection]:
    """A Core connection for writes that are each one statement: the ledger's hot path.

    On PostgreSQL every statement commits by itself (autocommit), without waiting for the
    WAL flush: no BEGIN, SET or COMMIT round trips, so a claim or a completion costs one
    round trip. A caller that needs two statements to hold together must not use this.
    A crash of the database server can forget the last few hundred milliseconds of step
    records, never half of one, and a forgotten record only makes an idempotent step run
    again. On SQLite (in-process, no round trips to save) it is one transaction. No ORM
    session: its bookkeeping costs more than the statement on this path.
    """
    if url is None:
        from workers.runtime.settings import get_settings

        url = get_settings().sqlalchemy_url
    engine = _statement_engine(url) if url.startswith("postgresql") else get_engine(url)
    try:
        with engine.begin() as conn:
            yield conn
    except DBAPIError as exc:
        if _lost(exc):
            raise TransientError(f"database unavailable: {exc.orig!s}") from exc
        raise


@contextmanager
def _guarded(session: Session) -> Iterator[None]:
    """Commit ``session`` after the block, roll back on error; a lost database is transient."""
    try:
        yield
        session.commit()
    except DBAPIError as exc:
        session.rollback()
        if _lost(exc):
            raise TransientError(f"database unavailable: {exc.orig!s}") from exc
        raise
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _lost(exc: DBAPIError) -> bool:
    """Whether the database was away (a killed backend, a restarted server): worth retrying.

    psycopg reports some of those as InterfaceError, flagged as a disconnect.
    """
    return isinstance(exc, OperationalError) or exc.connection_invalidated
