"""Billing tasks: beat closes the periods that ended into invoices; services read invoices."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any

import structlog
from pydantic import BaseModel, ConfigDict, StringConstraints

from workers.economics import billing, pricing
from workers.engine.public import Outcome, public_task, rejection
from workers.runtime.app import app
from workers.runtime.errors import NotFoundError, ValidationFailedError
from workers.runtime.models import Invoice, utcnow
from workers.runtime.schedule import claim_slot, slot_start
from workers.runtime.settings import get_settings
from workers.runtime.task import RetryingTask

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["CLOSE_TASK", "GetInvoice", "close_periods", "describe_invoice", "get_invoice"]

log = structlog.get_logger(__name__)

#: The beat task's name, also the name of its schedule slot.
CLOSE_TASK = "cul8er.billing.close_periods"
#: The slot of a daily close (month and day periods are closed by a daily crontab).
DAY = 24 * 3600.0


class GetInvoice(BaseModel):
    """Read one invoice: its period, total and lines."""

    model_config = ConfigDict(extra="forbid")

    invoice_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


def _slot_interval() -> float:
    settings = get_settings()
    if settings.billing_period in ("month", "day"):
        return DAY
    return settings.billing_close_interval


def _parse_as_of(value: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        message = f"as_of {value[:64]!r} is not an ISO 8601 date and time"
        raise ValidationFailedError(
            message, errors=[{"field": "as_of", "message": message}]
        ) from None
    # A moment without a zone is UTC, as every time cul8er stores.
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


@app.task(
    name=CLOSE_TASK,
    bind=True,
    base=RetryingTask,
    # A fleet's close takes longer than a step; each chunk commits, so a kill loses nothing.
    soft_time_limit=1800,
    time_limit=1810,
)
def close_periods(self: Any, as_of: str | None = None) -> dict[str, Any]:
    """Invoice every period that ended by ``as_of`` (ISO; default now); counts as JSON.

    From beat (no ``as_of``) the run first claims its schedule slot, so a second beat's
    message does nothing; a repeated close of the same periods inserts nothing either way.
    """
    if as_of is None:
        moment = utcnow()
        slot = slot_start(_slot_interval(), now=moment)
        # A redelivered message (a worker died mid-run) or a retry keeps its task id and
        # goes on; a second beat's message for the same slot has another id and stops.
        if not claim_slot(CLOSE_TASK, slot, task_id=self.request.id):
            log.info("billing_slot_taken", slot=slot.isoformat())
            return {"ok": True, "skipped": True, "slot": slot.isoformat()}
    else:
        try:
            moment = _parse_as_of(as_of)
        except ValidationFailedError as exc:
            return rejection(exc)
    summary = billing.close_periods(moment)
    return {"ok": True, **summary.as_dict()}


def describe_invoice(invoice: Invoice) -> dict[str, Any]:
    """An invoice as JSON (amounts as strings)."""
    return {
        "invoice_id": invoice.id,
        "tenant_id": invoice.tenant_id,
        "period_start": invoice.period_start.isoformat(),
        "period_end": invoice.period_end.isoformat(),
        "currency": invoice.currency,
        "total": str(pricing.money(invoice.total)),
        "status": invoice.status,
        "lines": invoice.lines,
        "created_at": invoice.created_at.isoformat(),
    }


@public_task("cul8er.billing.get_invoice", GetInvoice, idempotent=False)
def get_invoice(session: Session, payload: GetInvoice) -> Outcome:
    """One invoice, with its lines."""
    invoice = session.get(Invoice, payload.invoice_id)
    if invoice is None:
        raise NotFoundError(f"invoice {payload.invoice_id} does not exist")
    return Outcome(data=describe_invoice(invoice), tenant_id=invoice.tenant_id)
