"""Quotas and payment standing: what a tenant used this period against its plan, purely.

``tasks.quotas`` reads the usage rows and applies the plan's ``quota_policy``; this
module only computes periods, excesses, reasons and the payment record kept in
``Tenant.resources["payment"]``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from schemas.states import PaymentStatus
from schemas.tasks import PaymentFailed, PaymentSucceeded
from workers.economics.periods import PeriodKind, period_bounds

if TYPE_CHECKING:
    from schemas.plans import Plan

__all__ = [
    "Excess",
    "GIB",
    "PaymentFailed",
    "PaymentSucceeded",
    "clear_payment",
    "excesses",
    "payment_suspension_due",
    "period_start",
    "quota_reason",
    "record_payment_failure",
]

#: Bytes in the plans' GB (binary, as the catalog counts memory).
GIB: Final = 1024**3


def period_start(anchor: dt.date, period: PeriodKind, now: dt.datetime) -> dt.datetime:
    """The start of the billing period ``now`` falls in, counted from ``anchor`` (UTC).

    The same periods billing closes into invoices: a monthly period starts on the anchor's
    day of the month, or on the month's last day when it is shorter.
    """
    return period_bounds(anchor, period, now.astimezone(dt.UTC))[0]


@dataclass(frozen=True)
class Excess:
    """One quota exceeded: the metric, what was used and what the plan allows."""

    metric: str
    used: float
    limit: float
    unit: str = ""

    def describe(self) -> str:
        """``requests 10234 > 10000`` or ``storage 1.50 GB > 1 GB``."""
        if self.unit:
            return f"{self.metric} {self.used:.2f} {self.unit} > {self.limit:g} {self.unit}"
        return f"{self.metric} {self.used:.0f} > {self.limit:g}"

    def to_dict(self) -> dict[str, Any]:
        """The excess as JSON."""
        return {"metric": self.metric, "used": self.used, "limit": self.limit, "unit": self.unit}


def excesses(plan: Plan, *, requests: float, storage_bytes: float | None) -> list[Excess]:
    """The quotas of ``plan`` that this period's requests or the latest storage exceed."""
    found = []
    if plan.max_requests_per_month is not None and requests > plan.max_requests_per_month:
        found.append(Excess("requests", requests, float(plan.max_requests_per_month)))
    if plan.storage_gb is not None and storage_bytes is not None:
        used_gb = storage_bytes / GIB
        if used_gb > plan.storage_gb:
            found.append(Excess("storage", used_gb, plan.storage_gb, "GB"))
    return found


def quota_reason(found: list[Excess]) -> str:
    """The suspension reason: ``quota exceeded: requests 10234 > 10000``."""
    return "quota exceeded: " + ", ".join(e.describe() for e in found)


def record_payment_failure(
    payment: dict[str, Any] | None, *, invoice_id: str | None, now: dt.datetime, grace: float
) -> dict[str, Any]:
    """The payment record after a failure: the first unresolved failure starts the grace."""
    current = dict(payment or {})
    unpaid = (
        list(current.get("unpaid_invoices", []))
        if current.get("status") == PaymentStatus.FAILED
        else []
    )
    if invoice_id is not None and invoice_id not in unpaid:
        unpaid.append(invoice_id)
    if current.get("status") == PaymentStatus.FAILED:
        # A repeated failure never pushes the suspension further out.
        return {**current, "unpaid_invoices": unpaid, "last_failed_at": now.isoformat()}
    return {
        "status": PaymentStatus.FAILED,
        "failed_at": now.isoformat(),
        "last_failed_at": now.isoformat(),
        "suspend_after": (now + dt.timedelta(seconds=grace)).isoformat(),
        "unpaid_invoices": unpaid,
    }


def clear_payment(
    payment: dict[str, Any] | None, *, invoice_id: str | None, now: dt.datetime
) -> dict[str, Any]:
    """The payment record after a success: cleared once no failed invoice is left unpaid."""
    current = dict(payment or {})
    if current.get("status") not in (PaymentStatus.FAILED, PaymentStatus.SUSPENDED):
        return {**current, "status": PaymentStatus.OK, "paid_at": now.isoformat()}
    unpaid = [i for i in current.get("unpaid_invoices", []) if i != invoice_id]
    if invoice_id is not None and unpaid:
        return {**current, "unpaid_invoices": unpaid}
    return {
        "status": PaymentStatus.OK,
        "paid_at": now.isoformat(),
        "previous": {k: v for k, v in current.items() if k != "previous"},
    }


def payment_suspension_due(payment: dict[str, Any] | None, now: dt.datetime) -> bool:
    """Whether a failed payment's grace period is over (and no success cleared it)."""
    if not payment or payment.get("status") != PaymentStatus.FAILED:
        return False
    try:
        due = dt.datetime.fromisoformat(str(payment["suspend_after"]))
    except (KeyError, ValueError):
        return True  # a record without a readable deadline: its grace cannot be honoured
    return now >= due
