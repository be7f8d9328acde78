"""Usage, invoices and autoscale decisions as JSON views (read by the CLI and the HTTP API)."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from workers.runtime.models import AutoscaleDecision, Invoice, UsageRecord

if TYPE_CHECKING:
    import datetime as dt

    from sqlalchemy.orm import Session

__all__ = [
    "autoscale_decisions",
    "invoice_view",
    "metric_views",
    "money",
    "usage_rows",
    "usage_total",
]


def usage_total(aggregation: str, rows: list[UsageRecord]) -> float:
    """The rows' total as their aggregation reads: a sum, a peak or a time-weighted mean."""
    if aggregation == "max":
        return max(r.value for r in rows)
    if aggregation == "avg":
        seconds = [(r.window_end - r.window_start).total_seconds() for r in rows]
        covered = sum(seconds)
        if covered <= 0:
            return sum(r.value for r in rows) / len(rows)
        return sum(r.value * s for r, s in zip(rows, seconds, strict=True)) / covered
    return sum(r.value for r in rows)


def usage_rows(
    session: Session, tenant_id: str, since: dt.datetime, until: dt.datetime, metric: str | None
) -> list[UsageRecord]:
    """The tenant's usage rows whose window starts in [since, until), by metric and time."""
    query = (
        select(UsageRecord)
        .where(
            UsageRecord.tenant_id == tenant_id,
            UsageRecord.window_start >= since,
            UsageRecord.window_start < until,
        )
        .order_by(UsageRecord.metric, UsageRecord.window_start)
    )
    if metric:
        query = query.where(UsageRecord.metric == metric)
    return list(session.scalars(query))


def metric_views(rows: list[UsageRecord]) -> list[dict[str, Any]]:
    """One entry per metric: its aggregation, total, window count and rows."""
    grouped: dict[str, list[UsageRecord]] = {}
    for row in rows:
        grouped.setdefault(row.metric, []).append(row)
    return [
        {
            "metric": name,
            "aggregation": group[0].aggregation,
            "total": usage_total(group[0].aggregation, group),
            "windows": len(group),
            "rows": [
                {
                    "window_start": r.window_start.isoformat(),
                    "window_end": r.window_end.isoformat(),
                    "value": r.value,
                }
                for r in group
            ],
        }
        for name, group in grouped.items()
    ]


def money(value: Any) -> str:
    return str(Decimal(str(value)).quantize(Decimal("0.0001"))) if value is not None else "-"


def invoice_view(invoice: Invoice, *, lines: bool) -> dict[str, Any]:
    view: dict[str, Any] = {
        "invoice_id": invoice.id,
        "tenant_id": invoice.tenant_id,
        "period_start": invoice.period_start.isoformat(),
        "period_end": invoice.period_end.isoformat(),
        "currency": invoice.currency,
        "total": money(invoice.total),
        "status": invoice.status,
        "lines_count": len(invoice.lines or []),
        "created_at": invoice.created_at.isoformat(),
    }
    if lines:
        view["lines"] = list(invoice.lines or [])
    return view


def autoscale_decisions(session: Session, tenant_id: str, last: int) -> list[dict[str, Any]]:
    """The tenant's ``last`` autoscale decisions, newest first."""
    query = (
        select(AutoscaleDecision)
        .where(AutoscaleDecision.tenant_id == tenant_id)
        .order_by(AutoscaleDecision.decided_at.desc(), AutoscaleDecision.id.desc())
        .limit(last)
    )
    return [
        {
            "decided_at": d.decided_at.isoformat(),
            "window_start": d.window_start.isoformat(),
            "rule": d.rule,
            "action": d.action,
            "reason": d.reason,
            "inputs": d.inputs,
            "workflow_id": d.workflow_id,
        }
        for d in session.scalars(query)
    ]
