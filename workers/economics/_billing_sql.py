"""The billing close's bulk writes on PostgreSQL: a chunk's rows as one JSON parameter.

A chunk's thousands of parts and invoices go in through ``json_to_recordset``: one short
statement whose text never changes, so psycopg and the server parse it once per connection.
SQLAlchemy's ``executemany`` would send a multi-row ``VALUES`` text of megabytes instead,
which psycopg scans for placeholders in Python at every chunk. Amounts travel as decimal
strings and are cast to ``numeric`` by the server: exact, never through a float.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import text

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["fill_parts", "insert_invoices"]

_INSERT_INVOICES: Final = text(
    """
INSERT INTO invoices
    (id, tenant_id, period_start, period_end, currency, total, lines, status, created_at)
SELECT id, tenant_id, period_start, period_end, currency, total, lines, status, created_at
FROM json_to_recordset(CAST(:rows AS json)) AS r(
    id varchar, tenant_id varchar, period_start timestamp, period_end timestamp,
    currency varchar, total numeric, lines json, status varchar, created_at timestamp)
ON CONFLICT DO NOTHING
RETURNING id
"""
)
_FILL_PARTS: Final = text(
    """
INSERT INTO billing_parts (part_id, tenant_id, from_at, to_at, rec_after)
SELECT part_id, tenant_id, from_at, to_at, rec_after
FROM json_to_recordset(CAST(:rows AS json)) AS r(
    part_id integer, tenant_id varchar, from_at timestamp, to_at timestamp,
    rec_after timestamp)
"""
)


def _plain(value: Any) -> Any:
    """A row's value as JSON for the server: times naive UTC (as stored), amounts as text."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).replace(tzinfo=None).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} has no JSON form here")


def _dumps(rows: Sequence[Mapping[str, Any]]) -> str:
    # json.dumps' own separators: a ``json`` column keeps the text as written, and the
    # lines read the same as SQLAlchemy's JSON type writes them.
    return json.dumps(rows, default=_plain)


def insert_invoices(session: Session, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Insert ``rows`` (``invoices`` columns), skipping invoices that exist; the ids inserted."""
    return [str(value) for value in session.scalars(_INSERT_INVOICES, {"rows": _dumps(rows)})]


def fill_parts(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` into this transaction's ``billing_parts`` table."""
    session.execute(_FILL_PARTS, {"rows": _dumps(rows)})
