"""Metering's write on PostgreSQL: a chunk's usage rows and readings in one statement.

The rows go in as one JSON parameter (``json_to_recordset``), so the statement's text is
the same for every chunk: psycopg and the server parse and plan it once per connection,
where a row-by-row ``executemany`` runs one statement per row and a multi-row ``VALUES`` is
a new text each time (and psycopg parses a long text in Python). JSON, not arrays: the
standard library encodes it in C, where psycopg quotes array items one by one in Python.

The claim row (``CLAIM_METRIC``) decides who writes a tenant's window, as on every other
database: the other metrics and the readings are written only for the tenants whose
claim this statement inserted (data-modifying ``WITH`` parts, one snapshot).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import text

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["write_window"]

_COLUMNS: Final = "tenant_id, metric, window_start, window_end, value, aggregation, recorded_at"
_WRITE: Final = text(
    f"""
WITH usage AS (
    SELECT * FROM json_to_recordset(CAST(:usage AS json))
        AS u(tenant_id varchar, metric varchar, value float8, aggregation varchar)
), claimed AS (
    INSERT INTO usage_records ({_COLUMNS})
    SELECT tenant_id, metric, :start, :end, value, aggregation, :now
    FROM usage WHERE metric = :claim
    ON CONFLICT (tenant_id, metric, window_start) DO NOTHING
    RETURNING tenant_id
), rest AS (
    INSERT INTO usage_records ({_COLUMNS})
    SELECT u.tenant_id, u.metric, :start, :end, u.value, u.aggregation, :now
    FROM usage AS u JOIN claimed AS c ON c.tenant_id = u.tenant_id
    WHERE u.metric <> :claim
    ON CONFLICT (tenant_id, metric, window_start) DO NOTHING
), kept AS (
    INSERT INTO meter_readings (tenant_id, source, metric, value, taken_at)
    SELECT r.tenant_id, r.source, r.metric, r.value, r.taken_at
    FROM json_to_recordset(CAST(:readings AS json))
        AS r(tenant_id varchar, source varchar, metric varchar, value float8, taken_at timestamp)
    JOIN claimed AS c ON c.tenant_id = r.tenant_id
    ON CONFLICT (tenant_id, source, metric)
    DO UPDATE SET value = excluded.value, taken_at = excluded.taken_at
)
SELECT tenant_id FROM claimed
"""
)


def _naive(moment: dt.datetime) -> dt.datetime:
    """``moment`` as the columns keep it: UTC without a zone."""
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


def write_window(
    session: Session,
    window: tuple[dt.datetime, dt.datetime],
    usage: Mapping[str, Mapping[str, float]],
    aggregations: Mapping[str, str],
    kept: Iterable[Mapping[str, Any]],
    *,
    claim: str,
    now: dt.datetime,
) -> set[str] | None:
    """Write ``usage`` (tenant → metric → value) for ``window`` and the ``kept`` readings of
    the tenants whose claim row is new; those tenants.

    ``None`` (nothing written) when a value has no JSON form (NaN, infinity): the caller
    writes that chunk row by row instead.
    """
    rows = [
        {"tenant_id": t, "metric": m, "value": float(v), "aggregation": aggregations[m]}
        for t in sorted(usage)
        for m, v in usage[t].items()
    ]
    # One reading per key: ON CONFLICT may not touch a row twice in one statement.
    readings = {
        (r["tenant_id"], r["source"], r["metric"]): {
            "tenant_id": r["tenant_id"],
            "source": r["source"],
            "metric": r["metric"],
            "value": float(r["value"]),
            "taken_at": _naive(r["taken_at"]).isoformat(),
        }
        for r in kept
    }
    try:
        usage_json = json.dumps(rows, allow_nan=False)
        readings_json = json.dumps(list(readings.values()), allow_nan=False)
    except ValueError:
        return None
    won = session.scalars(
        _WRITE,
        {
            "usage": usage_json,
            "readings": readings_json,
            "start": _naive(window[0]),
            "end": _naive(window[1]),
            "now": _naive(now),
            "claim": claim,
        },
    )
    return set(won)
