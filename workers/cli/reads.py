"""The read commands' rows, straight from the database driver: no SQLAlchemy, no models.

A command that prints a few rows would otherwise spend most of its time importing
SQLAlchemy and building the ORM's mappers. Here a query is SQL with ``:name`` parameters
run on a DBAPI connection of the command's own: ``sqlite3`` for a plain SQLite file URL,
``psycopg`` for a plain ``postgresql+psycopg`` URL; any other URL (a query string, another
driver) goes through SQLAlchemy's engine as before. Values come back as the models give
them: aware UTC datetimes, dates, decoded JSON, a SQLite ``NUMERIC`` as its 4-place decimal.

The views in :mod:`workers.cli.views` build from these rows what ``workers/engine/views.py``
and ``workers/economics/views.py`` build from the models; ``tests/unit/cli/test_reads.py``
compares the two on the same rows.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from workers.runtime.errors import TransientError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Reader", "reader"]

#: As ``workers.runtime.db.SQLITE_BUSY_TIMEOUT_MS``: how long a read waits out a writer (s).
SQLITE_TIMEOUT: Final = 30.0

_SQLITE = re.compile(r"^sqlite(?:\+pysqlite)?:///(?P<path>[^?#%]+)$")
_POSTGRES = re.compile(r"^postgresql\+psycopg://(?P<rest>[^?#]*)$")
#: A ``:name`` parameter, not a ``::type`` cast.
_PARAM = re.compile(r"(?<![:\w]):(\w+)")

Row = dict[str, Any]


class Reader:
    """Run SELECTs on one connection; convert column values as the models' types do."""

    def __init__(
        self, execute: Callable[[str, dict[str, Any]], list[Row]], *, sqlite: bool
    ) -> None:
        self._execute = execute
        self.sqlite = sqlite

    def rows(self, sql: str, **params: Any) -> list[Row]:
        """The rows of ``sql`` (``:name`` parameters), each as a dict by column name."""
        return self._execute(sql, params)

    def json(self, value: Any) -> Any:
        """A JSON column's value: SQLite keeps the text, PostgreSQL's driver decodes it."""
        if self.sqlite and isinstance(value, str | bytes):
            return json.loads(value)
        return value

    @staticmethod
    def utc(value: Any) -> dt.datetime | None:
        """A ``UTCDateTime`` column's value: aware, in UTC (SQLite keeps ISO text)."""
        if value is None:
            return None
        moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
        assert isinstance(moment, dt.datetime)
        return moment.replace(tzinfo=dt.UTC)

    @staticmethod
    def date(value: Any) -> dt.date:
        """A ``Date`` column's value."""
        day = dt.date.fromisoformat(value) if isinstance(value, str) else value
        assert isinstance(day, dt.date)
        return day

    def moment(self, value: dt.datetime) -> Any:
        """An aware datetime as a ``UTCDateTime`` parameter: naive UTC, as SQLite stores it."""
        naive = value.astimezone(dt.UTC).replace(tzinfo=None)
        return naive.strftime("%Y-%m-%d %H:%M:%S.%f") if self.sqlite else naive

    def decimal(self, value: Any, scale: int) -> Any:
        """A ``Numeric(…, scale)`` column's value: SQLite hands a number SQLAlchemy rounds so."""
        if self.sqlite and isinstance(value, int | float):
            return Decimal(f"{value:.{scale}f}")
        return value


@contextmanager
def reader(url: str | None = None) -> Iterator[Reader]:
    """A :class:`Reader` on the configured database, for one command's reads.

    A lost or locked database is a ``TransientError``, as in ``session_scope``.
    """
    if url is None:
        from workers.runtime.essentials import essentials

        url = essentials().sqlalchemy_url
    sqlite, postgres = _SQLITE.match(url), _POSTGRES.match(url)
    if sqlite:
        opened = _sqlite(sqlite["path"])
    elif postgres:
        opened = _postgres("postgresql://" + postgres["rest"])
    else:
        opened = _sqlalchemy(url)
    with opened as read:
        yield read


@contextmanager
def _sqlite(path: str) -> Iterator[Reader]:
    import sqlite3

    if path != ":memory:":
        # As ``get_engine`` does: a missing data dir is made, then "no such table" says why.
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        conn = sqlite3.connect(path, timeout=SQLITE_TIMEOUT, isolation_level=None)
    except sqlite3.OperationalError as exc:
        raise TransientError(f"database unavailable: {exc!s}") from exc

    def execute(sql: str, params: dict[str, Any]) -> list[Row]:
        cursor = conn.execute(sql, params)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    try:
        # One snapshot for every read of the command; a reader never takes the write lock.
        conn.execute("BEGIN")
        yield Reader(execute, sqlite=True)
    except sqlite3.OperationalError as exc:
        raise TransientError(f"database unavailable: {exc!s}") from exc
    finally:
        conn.close()


@contextmanager
def _postgres(conninfo: str) -> Iterator[Reader]:
    import psycopg

    try:
        conn = psycopg.connect(conninfo)
    except psycopg.OperationalError as exc:
        raise TransientError(f"database unavailable: {exc!s}") from exc

    def execute(sql: str, params: dict[str, Any]) -> list[Row]:
        with conn.cursor() as cursor:
            cursor.execute(_PARAM.sub(r"%(\1)s", sql.replace("%", "%%")), params)
            assert cursor.description is not None
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    try:
        yield Reader(execute, sqlite=False)
    except psycopg.OperationalError as exc:
        raise TransientError(f"database unavailable: {exc!s}") from exc
    finally:
        conn.close()


@contextmanager
def _sqlalchemy(url: str) -> Iterator[Reader]:
    from sqlalchemy import text

    from workers.runtime.db import session_scope

    with session_scope(url) as session:

        def execute(sql: str, params: dict[str, Any]) -> list[Row]:
            return [dict(row) for row in session.execute(text(sql), params).mappings()]

        yield Reader(execute, sqlite=url.startswith("sqlite"))
