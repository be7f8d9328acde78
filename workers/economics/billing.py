"""Billing: each tenant's due periods closed into invoices, exactly once (the SQL side).

The periods come from :mod:`workers.economics.periods` and their prices from
:mod:`workers.economics.pricing`. Usage is aggregated in SQL for every due part of a chunk
of tenants at once (one ``GROUP BY`` over a temporary table of parts), and the invoices of
the chunk are inserted in one statement that ignores the ones already there.

Usage that arrives after its period was invoiced (``recorded_at`` after that invoice's
``created_at``) is billed by the next invoice on the plan of that moment, as lines marked
``late``: every usage row is billed once, by the invoice whose cut-off first saw it.

Closing is idempotent: an invoice's id is derived from its tenant and period, the table
is unique on both, and only the close that inserted an invoice emits its
``invoice.finalized`` event (whose id is derived from the invoice id). Closes of one
database are serialised (an advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite), so a second beat or a redelivered message finds the work done.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, get_args

import structlog
from sqlalchemy import (
    ARRAY,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    any_,
    cast,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import sqlite

from schemas.states import TenantStatus
from workers.economics._billing_sql import fill_parts, insert_invoices
from workers.economics.periods import MAX_PERIODS_PER_RUN, PeriodKind, due_periods
from workers.economics.plans import get_plan
from workers.economics.pricing import (
    Part,
    Priced,
    Span,
    Usage,
    in_billing_units,
    price_period,
    split_period,
)
from workers.engine.events import emit
from workers.runtime.db import session_scope
from workers.runtime.errors import ConfigError, Cul8erError
from workers.runtime.models import Invoice, PlanPeriod, Tenant, UsageRecord, UTCDateTime, utcnow
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy import Select
    from sqlalchemy.engine import Row
    from sqlalchemy.orm import Session

    from schemas.plans import Plan

    #: A tenant as closing reads it: id, billing anchor, status, last update.
    _TenantRow = Row[str, dt.date, str, dt.datetime]

__all__ = [
    "CloseSummary",
    "DEFAULT_CHUNK_SIZE",
    "DuePeriod",
    "close_periods",
    "invoice_event_id",
    "invoice_id",
    "publish_pending",
]

log = structlog.get_logger(__name__)

#: Tenants whose periods one transaction closes: big enough for set-based aggregation to
#: pay off, small enough that one transaction does not hold the writers back for long.
DEFAULT_CHUNK_SIZE: Final = 2000
#: Before any usage: the lower bound of the window of late usage.
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: Invoice ids and event ids are uuid5 in these namespaces: the same close, the same ids.
_INVOICE_NS: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://cul8er.dev/billing/invoice")
_EVENT_NS: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://cul8er.dev/billing/invoice-event")
#: The columns of an invoice its ``invoice.finalized`` event is made of.
_EVENT_COLUMNS: Final = (
    "id",
    "tenant_id",
    "period_start",
    "period_end",
    "currency",
    "total",
    "lines",
    "created_at",
)
#: ``pg_advisory_xact_lock`` key of billing closes ("cul8erb1").
_PG_LOCK_KEY: Final = 0x6375_6C38_6572_6231


# -- identities ------------------------------------------------------------------------------


def invoice_id(tenant_id: str, start: dt.datetime) -> str:
    """The id of ``tenant_id``'s invoice for the period starting at ``start`` (32 hex)."""
    moment = start.astimezone(dt.UTC).isoformat()
    return uuid.uuid5(_INVOICE_NS, f"{tenant_id}|{moment}").hex


def invoice_event_id(invoice: str) -> uuid.UUID:
    """The ``invoice.finalized`` event id of an invoice: its webhook Idempotency-Key."""
    return uuid.uuid5(_EVENT_NS, invoice)


# -- closing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DuePeriod:
    """One period of one tenant to invoice, with its parts and, first, the late usage."""

    tenant_id: str
    start: dt.datetime
    end: dt.datetime
    parts: tuple[Part, ...]
    #: Bill usage of earlier windows recorded after this moment (the last invoice's).
    late_after: dt.datetime | None = None


@dataclass
class CloseSummary:
    """What one ``close_periods`` call did."""

    as_of: dt.datetime
    tenants: int = 0
    periods: int = 0
    #: Ids of the invoices this call inserted, oldest period first.
    inserted: list[str] = field(default_factory=list)
    #: ``invoice.finalized`` events this call published (its own and any left unpublished).
    published: int = 0
    #: Tenants with more due periods than one run closes.
    backlog: int = 0
    #: Tenants skipped because a plan of theirs could not be priced.
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON (counts only: a fleet's ids do not belong in a result)."""
        return {
            "as_of": self.as_of.isoformat(),
            "tenants": self.tenants,
            "periods": self.periods,
            "invoices": len(self.inserted),
            "published": self.published,
            "backlog": self.backlog,
            "failed": self.failed,
        }


@dataclass(frozen=True)
class _CloseRun:
    """What every chunk of one ``close_periods`` call is closed by."""

    as_of: dt.datetime
    period: PeriodKind
    catalog: Path | None
    chunk_size: int
    max_periods: int


#: The due parts of one chunk; ``part_id`` indexes the chunk's list of parts.
_PARTS = Table(
    "billing_parts",
    MetaData(),
    Column("part_id", Integer, nullable=False),
    Column("tenant_id", String(40), nullable=False),
    Column("from_at", UTCDateTime(), nullable=False),
    Column("to_at", UTCDateTime(), nullable=False),
    Column("rec_after", UTCDateTime(), nullable=False),
)
_PARTS_COLUMNS = (
    "part_id integer NOT NULL, tenant_id varchar(40) NOT NULL, from_at timestamp NOT NULL, "
    "to_at timestamp NOT NULL, rec_after timestamp NOT NULL"
)


def close_periods(
    as_of: dt.datetime | None = None,
    *,
    url: str | None = None,
    period: PeriodKind | None = None,
    plans_file: Path | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_periods: int = MAX_PERIODS_PER_RUN,
) -> CloseSummary:
    """Invoice every period that ended by ``as_of`` (now; never later) and is not yet.

    Tenants are taken in chunks of ``chunk_size``, one transaction each. Invoices are
    inserted unpublished, and their ``invoice.finalized`` events emitted once the chunk
    is committed, then marked published: a close killed in between leaves them to the
    next close, which publishes whatever is unpublished first (an outbox). A repeated
    event carries the same event id, which webhooks send as the Idempotency-Key.
    """
    settings = get_settings()
    now = utcnow()
    moment = min(as_of or now, now)  # a period still running is never closed
    kind: PeriodKind = period or settings.billing_period
    if kind not in get_args(PeriodKind):
        raise ConfigError(f"unknown billing period {kind!r}")
    catalog = plans_file if plans_file is not None else settings.plans_file
    run = _CloseRun(moment, kind, catalog, chunk_size, max_periods)
    summary = CloseSummary(as_of=moment)
    summary.published += publish_pending(url=url, chunk_size=chunk_size)
    after = ""
    while True:
        with session_scope(url) as session:
            _lock(session)
            last, finalized = _close_chunk(session, after, run, summary)
        if finalized:
            summary.published += _publish_inserted(finalized, url=url)
        if last is None:
            break
        after = last
    log.info("billing_closed", **summary.as_dict())
    return summary


def publish_pending(*, url: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Emit ``invoice.finalized`` for every invoice not yet published; how many.

    Each batch is emitted, then marked, under the close lock: a kill between the two
    emits the batch again later, under the same event ids.
    """
    published = 0
    while True:
        with session_scope(url) as session:
            _lock(session)
            pending = session.scalars(
                select(Invoice)
                .where(Invoice.published_at.is_(None))
                .order_by(Invoice.created_at, Invoice.id)
                .limit(chunk_size)
            ).all()
            if not pending:
                return published
            for invoice in pending:
                _emit(invoice)
            session.execute(
                update(Invoice)
                .where(Invoice.id.in_([invoice.id for invoice in pending]))
                .values(published_at=utcnow())
            )
        published += len(pending)


def _publish_inserted(rows: Sequence[Mapping[str, Any]], *, url: str | None) -> int:
    """:func:`publish_pending` for the invoices this close just committed, from their rows
    in memory (not read back); those another close published meanwhile are left out.

    The rows are marked and their events emitted in one transaction under the close lock:
    a kill before its commit leaves them unpublished, for the next close to emit again.
    """
    ids = [str(row["id"]) for row in rows]
    with session_scope(url) as session:
        _lock(session)
        if session.get_bind().dialect.name == "postgresql":
            # One array parameter, not an IN list of thousands of placeholders.
            chosen: Any = Invoice.id == any_(cast(ids, ARRAY(String)))
        else:
            chosen = Invoice.id.in_(ids)
        marked = set(
            session.scalars(
                update(Invoice)
                .where(chosen, Invoice.published_at.is_(None))
                .values(published_at=utcnow())
                .returning(Invoice.id)
            )
        )
        for row in rows:
            if row["id"] in marked:
                _emit(row)
    return len(marked)


def _lock(session: Session) -> None:
    """Serialise closes: a concurrent one waits, then finds this one's invoices."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    else:
        # SQLite: the first statement takes the write lock (BEGIN IMMEDIATE) until commit.
        session.execute(text("SELECT 1"))


def _close_chunk(
    session: Session, after: str, run: _CloseRun, summary: CloseSummary
) -> tuple[str | None, list[dict[str, Any]]]:
    """Close the due periods of the next chunk of tenants; (last tenant id, invoices)."""
    tenants = _next_tenants(session, after, run.chunk_size)
    if not tenants:
        return None, []
    summary.tenants += len(tenants)
    last_id: str = tenants[-1].id
    due = _due_in_chunk(session, tenants, run, summary)
    if not due:
        return last_id, []
    # Usage recorded after this moment belongs to the next invoice (as late usage): the
    # cut-off is the invoice's created_at, fixed before anything is read.
    cutoff = utcnow()
    usage, late = _aggregate(session, due, cutoff)
    rows = _invoice_rows(due, usage, late, run.catalog, cutoff, summary)
    summary.periods += len(rows)
    inserted = set(_insert_invoices(session, rows))
    finalized = [row for row in rows if row["id"] in inserted]
    summary.inserted.extend(row["id"] for row in finalized)
    return last_id, finalized


def _next_tenants(session: Session, after: str, limit: int) -> Sequence[_TenantRow]:
    """The next ``limit`` tenants by id after ``after``: what closing needs of each."""
    return session.execute(
        select(Tenant.id, Tenant.billing_anchor, Tenant.status, Tenant.updated_at)
        .where(Tenant.id > after)
        .order_by(Tenant.id)
        .limit(limit)
    ).all()


def _plan_history(session: Session, first_id: str, last_id: str) -> dict[str, list[Span]]:
    """The plan spans of the tenants with ids in ``[first_id, last_id]``, oldest first."""
    history: dict[str, list[Span]] = defaultdict(list)
    for row in session.execute(
        select(PlanPeriod.tenant_id, PlanPeriod.plan, PlanPeriod.start_at, PlanPeriod.end_at)
        .where(PlanPeriod.tenant_id >= first_id, PlanPeriod.tenant_id <= last_id)
        .order_by(PlanPeriod.tenant_id, PlanPeriod.start_at)
    ):
        history[row.tenant_id].append((row.plan, row.start_at, row.end_at))
    return history


def _last_invoices(
    session: Session, first_id: str, last_id: str
) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """Each tenant's latest invoice (ids in ``[first_id, last_id]``): (period end, made at)."""
    latest = (
        select(Invoice.tenant_id, func.max(Invoice.period_start).label("period_start"))
        .where(Invoice.tenant_id >= first_id, Invoice.tenant_id <= last_id)
        .group_by(Invoice.tenant_id)
        .subquery()
    )
    return {
        row.tenant_id: (row.period_end, row.created_at)
        for row in session.execute(
            select(Invoice.tenant_id, Invoice.period_end, Invoice.created_at).join(
                latest,
                and_(
                    Invoice.tenant_id == latest.c.tenant_id,
                    Invoice.period_start == latest.c.period_start,
                ),
            )
        )
    }


def _due_in_chunk(
    session: Session, tenants: Sequence[_TenantRow], run: _CloseRun, summary: CloseSummary
) -> list[DuePeriod]:
    """The due periods of ``tenants`` (a chunk sorted by id), each tenant's oldest first."""
    first_id, last_id = tenants[0].id, tenants[-1].id
    history = _plan_history(session, first_id, last_id)
    previous = _last_invoices(session, first_id, last_id)
    due: list[DuePeriod] = []
    for tenant in tenants:
        spans = history.get(tenant.id)
        if not spans:
            continue  # never on a plan: nothing to bill
        due.extend(_tenant_due(tenant, spans, previous.get(tenant.id), run, summary))
    return due


def _tenant_due(
    tenant: _TenantRow,
    spans: Sequence[Span],
    last: tuple[dt.datetime, dt.datetime] | None,
    run: _CloseRun,
    summary: CloseSummary,
) -> list[DuePeriod]:
    """One tenant's due periods since its ``last`` invoice; the first bills the late usage."""
    # A terminated tenant's open plan span ends when it was terminated.
    until = tenant.updated_at if tenant.status == TenantStatus.TERMINATED else None
    since = last[0] if last else min(span[1] for span in spans)
    periods = due_periods(
        tenant.billing_anchor,
        run.period,
        since=since,
        as_of=run.as_of,
        until=until,
        limit=run.max_periods,
    )
    if len(periods) == run.max_periods:
        summary.backlog += 1
    late_after = last[1] if last else None
    due: list[DuePeriod] = []
    for start, end in periods:
        parts = split_period(start, end, spans, until=until)
        if not parts:
            continue  # a stretch off every plan (before sign-up, after termination)
        due.append(DuePeriod(tenant.id, start, end, tuple(parts), late_after))
        late_after = None  # later periods of this run: nothing recorded after the cut-off
    return due


def _invoice_rows(
    due: Sequence[DuePeriod],
    usage: Mapping[int, Mapping[int, Sequence[Usage]]],
    late: Mapping[int, Sequence[Usage]],
    catalog: Path | None,
    cutoff: dt.datetime,
    summary: CloseSummary,
) -> list[dict[str, Any]]:
    """The invoice row of each due period, priced; none for a tenant's periods from the
    first one its plans cannot price (counted in ``summary.failed``)."""
    rows: list[dict[str, Any]] = []
    unpriced: set[str] = set()
    plans: dict[str, Plan] = {}

    def plan_of(name: str) -> Plan:
        # Each plan once per chunk (an unknown one raises every time it is asked for).
        if name not in plans:
            plans[name] = get_plan(name, catalog)
        return plans[name]

    for position, item in enumerate(due):
        if item.tenant_id in unpriced:
            continue  # its periods are closed in order: none after one left open
        try:
            priced = price_period(
                item.start,
                item.end,
                item.parts,
                usage[position],
                plan_of,
                late=late.get(position, ()),
            )
        except Cul8erError as exc:
            # One tenant on a plan the catalog lost must not hold back everyone's invoices.
            log.error("billing_unpriceable", tenant_id=item.tenant_id, error=str(exc))
            unpriced.add(item.tenant_id)
            summary.failed += 1
            continue
        rows.append(_invoice_row(item, priced, cutoff))
    return rows


def _invoice_row(item: DuePeriod, priced: Priced, cutoff: dt.datetime) -> dict[str, Any]:
    """The ``invoices`` row of a priced period, made at ``cutoff``."""
    return {
        "id": invoice_id(item.tenant_id, item.start),
        "tenant_id": item.tenant_id,
        "period_start": item.start,
        "period_end": item.end,
        "currency": priced.currency,
        "total": priced.total,
        "lines": priced.lines,
        "status": "finalized",
        "created_at": cutoff,
    }


def _aggregate(
    session: Session, due: Sequence[DuePeriod], cutoff: dt.datetime
) -> tuple[dict[int, dict[int, list[Usage]]], dict[int, list[Usage]]]:
    """Usage of every due part (by period, then part) and late usage (by period).

    One ``GROUP BY`` over a temporary table holding every part of the chunk.
    """
    owners = _fill_parts(session, due)
    usage: dict[int, dict[int, list[Usage]]] = defaultdict(lambda: defaultdict(list))
    late: dict[int, list[Usage]] = defaultdict(list)
    for part_id, metric, aggregation, total, peak, mean, first, last in session.execute(
        _usage_by_part(cutoff)
    ):
        raw = {"sum": total, "max": peak}.get(aggregation, mean)
        name, value = in_billing_units(metric, Decimal(str(raw)))
        position, index = owners[part_id]
        found = Usage(name, aggregation, value, first, last)
        if index is None:
            late[position].append(found)
        else:
            usage[position][index].append(found)
    return usage, late


def _part_rows(
    due: Sequence[DuePeriod],
) -> tuple[list[dict[str, Any]], list[tuple[int, int | None]]]:
    """The parts table's rows for ``due``, and whose each ``part_id`` is: (period, part
    index), or (period, ``None``) for the late usage recorded before that period."""
    spans: list[tuple[str, dt.datetime, dt.datetime, dt.datetime]] = []
    owners: list[tuple[int, int | None]] = []
    for position, item in enumerate(due):
        for index, part in enumerate(item.parts):
            spans.append((item.tenant_id, part.start, part.end, _EPOCH))
            owners.append((position, index))
        if item.late_after is not None:
            spans.append((item.tenant_id, _EPOCH, item.start, item.late_after))
            owners.append((position, None))
    rows = [
        {"part_id": part_id, "tenant_id": tenant, "from_at": lo, "to_at": hi, "rec_after": after}
        for part_id, (tenant, lo, hi, after) in enumerate(spans)
    ]
    return rows, owners


def _fill_parts(session: Session, due: Sequence[DuePeriod]) -> list[tuple[int, int | None]]:
    """Load ``due``'s parts into this transaction's parts table; whose each ``part_id`` is."""
    dialect = session.get_bind().dialect.name
    suffix = " ON COMMIT DELETE ROWS" if dialect == "postgresql" else ""
    session.execute(
        text(f"CREATE TEMPORARY TABLE IF NOT EXISTS billing_parts ({_PARTS_COLUMNS}){suffix}")
    )
    session.execute(_PARTS.delete())
    rows, owners = _part_rows(due)
    if dialect == "postgresql":
        fill_parts(session, rows)
    else:
        session.execute(_PARTS.insert(), rows)
    if dialect == "postgresql":
        # Row counts for the planner: an index walk per part for a few tenants, a hash
        # join over the usage table for a fleet.
        session.execute(text("ANALYZE billing_parts"))
    return owners


def _usage_by_part(cutoff: dt.datetime) -> Select[Any]:
    """Per part and metric: the aggregation, sum, peak, mean, first and last window of the
    usage in the part's windows, recorded after its ``rec_after`` and by ``cutoff``."""
    parts, used = _PARTS.c, UsageRecord.__table__.c
    return (
        select(
            parts.part_id,
            used.metric,
            func.min(used.aggregation),
            func.sum(used.value),
            func.max(used.value),
            func.avg(used.value),
            func.min(used.window_start),
            func.max(used.window_end),
        )
        .select_from(
            _PARTS.join(
                UsageRecord.__table__,
                and_(
                    used.tenant_id == parts.tenant_id,
                    used.window_start >= parts.from_at,
                    used.window_start < parts.to_at,
                    used.recorded_at > parts.rec_after,
                    used.recorded_at <= cutoff,
                ),
            )
        )
        .group_by(parts.part_id, used.metric)
    )


def _insert_invoices(session: Session, rows: list[dict[str, Any]]) -> list[str]:
    """Insert ``rows``, skipping invoices that exist; the ids actually inserted."""
    if not rows:
        return []
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return insert_invoices(session, rows)
    if dialect == "sqlite":
        statement: Any = sqlite.insert(Invoice).on_conflict_do_nothing()
    else:  # pragma: no cover - cul8er runs on PostgreSQL and SQLite
        raise ConfigError(f"billing does not support the {dialect} database")
    inserted = session.execute(statement.returning(Invoice.id), rows).scalars().all()
    return [str(value) for value in inserted]


def _emit(invoice: Invoice | Mapping[str, Any]) -> None:
    """``invoice.finalized`` for a committed invoice (its row, or its columns by name)."""
    row: Mapping[str, Any] = (
        {name: getattr(invoice, name) for name in _EVENT_COLUMNS}
        if isinstance(invoice, Invoice)
        else invoice
    )
    emit(
        "invoice.finalized",
        tenant_id=row["tenant_id"],
        subject=row["id"],
        event_id=invoice_event_id(row["id"]),
        occurred_at=row["created_at"],
        data={
            "invoice_id": row["id"],
            "tenant_id": row["tenant_id"],
            "period_start": row["period_start"].isoformat(),
            "period_end": row["period_end"].isoformat(),
            "currency": row["currency"],
            "total": str(row["total"]),
            "lines": row["lines"],
            "created_at": row["created_at"].isoformat(),
        },
    )
