"""``/api/v1`` reads of what happened: usage, invoices, autoscale decisions, the audit trail.

Each reads the database (nothing changes), scoped to the tenants the caller may see; payment
events are the public tasks ``cul8er.billing.payment_failed | payment_succeeded``.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from workers.api.deps import Caller, IdempotencyKey, Writer
from workers.api.enqueue import call
from workers.api.problems import from_task_answer
from workers.api.roles import Action, authorize, visible_tenants
from workers.economics.views import autoscale_decisions, invoice_view, metric_views, usage_rows
from workers.runtime.db import session_scope
from workers.runtime.errors import NotFoundError
from workers.runtime.models import AuditEvent, Invoice, Tenant

__all__ = ["router"]

router = APIRouter(tags=["usage, billing and audit"])

Limit = Annotated[int, Query(ge=1, le=500)]


class PaymentEvent(BaseModel):
    """A billing provider's word on an invoice."""

    model_config = ConfigDict(extra="forbid", strict=True)
    invoice_id: Annotated[str, Field(max_length=64)] | None = None


def _tenant(tenant_id: str) -> None:
    with session_scope() as session:
        if session.get(Tenant, tenant_id) is None:
            raise NotFoundError(f"tenant {tenant_id!r} does not exist")


@router.get("/tenants/{tenant_id}/usage", summary="A tenant's metered usage per metric")
def usage(
    tenant_id: str,
    caller: Caller,
    since: Annotated[dt.datetime | None, Query(description="Default: 24 hours ago.")] = None,
    until: Annotated[dt.datetime | None, Query(description="Default: now.")] = None,
    metric: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    """Totals and windows of each metric in [since, until)."""
    authorize(caller, Action.USAGE_READ, tenant_id=tenant_id)
    _tenant(tenant_id)
    end = _aware(until) or dt.datetime.now(dt.UTC)
    start = _aware(since) or end - dt.timedelta(days=1)
    with session_scope() as session:
        rows = usage_rows(session, tenant_id, start, end, metric)
        metrics = metric_views(rows)
    return {
        "tenant_id": tenant_id,
        "since": start.isoformat(),
        "until": end.isoformat(),
        "metrics": metrics,
    }


def _aware(moment: dt.datetime | None) -> dt.datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


@router.get("/invoices", summary="Invoices, newest period first")
def invoices(
    caller: Caller, tenant_id: Annotated[str | None, Query(max_length=40)] = None, limit: Limit = 50
) -> dict[str, Any]:
    """Invoices of the tenants the caller may see."""
    authorize(caller, Action.USAGE_READ, tenant_id=tenant_id)
    query = select(Invoice).order_by(Invoice.period_start.desc(), Invoice.id).limit(limit)
    seen = visible_tenants(caller)
    if seen is not None:
        query = query.where(Invoice.tenant_id.in_(seen))
    if tenant_id is not None:
        query = query.where(Invoice.tenant_id == tenant_id)
    with session_scope() as session:
        return {"items": [invoice_view(i, lines=False) for i in session.scalars(query)]}


@router.get("/invoices/{invoice_id}", summary="One invoice with its lines")
def invoice(invoice_id: str, caller: Caller) -> dict[str, Any]:
    """The invoice, if the caller may see its tenant."""
    with session_scope() as session:
        found = session.get(Invoice, invoice_id)
        seen = visible_tenants(caller)
        if found is None or (seen is not None and found.tenant_id not in seen):
            raise NotFoundError(f"invoice {invoice_id!r} does not exist")
        authorize(caller, Action.USAGE_READ, tenant_id=found.tenant_id)
        return invoice_view(found, lines=True)


@router.get("/tenants/{tenant_id}/autoscale", summary="A tenant's latest autoscale decisions")
def autoscale(tenant_id: str, caller: Caller, limit: Limit = 20) -> dict[str, Any]:
    """Decisions, newest first, with the inputs each was taken on."""
    authorize(caller, Action.USAGE_READ, tenant_id=tenant_id)
    _tenant(tenant_id)
    with session_scope() as session:
        return {"tenant_id": tenant_id, "items": autoscale_decisions(session, tenant_id, limit)}


@router.get("/audit", summary="The audit trail, newest first")
def audit(
    caller: Caller,
    tenant_id: Annotated[str | None, Query(max_length=40)] = None,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 100,
) -> dict[str, Any]:
    """Audit events (who did what, when), filtered by tenant and kind."""
    authorize(caller, Action.AUDIT_READ, tenant_id=tenant_id)
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if tenant_id is not None:
        query = query.where(AuditEvent.tenant_id == tenant_id)
    if kind is not None:
        query = query.where(AuditEvent.kind == kind)
    with session_scope() as session:
        items = [
            {
                "id": e.id,
                "tenant_id": e.tenant_id,
                "kind": e.kind,
                "data": e.data,
                "at": e.occurred_at.isoformat(),
            }
            for e in session.scalars(query)
        ]
    return {"items": items}


def _payment(kind: str) -> None:
    def route(
        tenant_id: str, body: PaymentEvent, caller: Writer, key: IdempotencyKey = None
    ) -> Response:
        authorize(caller, Action.BILLING_WRITE, tenant_id=tenant_id)
        kwargs: dict[str, Any] = {"tenant_id": tenant_id}
        if body.invoice_id is not None:
            kwargs["invoice_id"] = body.invoice_id
        answer = call(f"cul8er.billing.payment_{kind}", kwargs, key=key, subject=caller.subject)
        return JSONResponse(answer) if answer.get("ok") else from_task_answer(answer)

    route.__name__ = f"payment_{kind}"
    route.__doc__ = f"The billing provider says a payment {kind}."
    router.post(f"/tenants/{{tenant_id}}/payments/{kind}", summary=route.__doc__)(route)


for _kind in ("failed", "succeeded"):
    _payment(_kind)
