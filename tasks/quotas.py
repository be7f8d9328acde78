"""Quota enforcement and payment standing.

``cul8er.quotas.enforce`` compares each active tenant's requests this billing period and
its latest storage with its plan, and applies the plan's ``quota_policy`` once per tenant
and period: ``suspend`` starts the suspend workflow, ``throttle`` marks the tenant
throttled, ``bill_overage`` only reports (billing prices the overage). It also suspends
tenants whose failed payment (``cul8er.billing.payment_failed``) outlived its grace.
Each once-only effect is guarded by a key in ``operations`` written in the same
transaction as the effect, so a repeated or concurrent run does it once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from schemas.states import PaymentStatus, Phase, TenantStatus
from tasks import workflows as wf
from tasks.autoscale import start_tenant_workflow
from workers.economics.plans import load_catalog
from workers.economics.quotas import (
    PaymentFailed,
    PaymentSucceeded,
    clear_payment,
    excesses,
    payment_suspension_due,
    period_start,
    quota_reason,
    record_payment_failure,
)
from workers.engine import ledger
from workers.engine.events import emit
from workers.engine.public import Outcome, public_task
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.errors import NotFoundError
from workers.runtime.models import AuditEvent, Operation, Tenant, UsageRecord, utcnow
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from schemas.plans import Plan

__all__ = ["ENFORCE", "Enforcement", "enforce", "enforce_quotas"]

log = structlog.get_logger(__name__)

ENFORCE = "cul8er.quotas.enforce"
#: Key prefixes of the once-only effects in ``operations``.
QUOTA_KEY = "cul8er.quotas.exceeded"
PAYMENT_KEY = "cul8er.billing.payment_suspend"


@dataclass
class Enforcement:
    """What one run did, and the workflows and events to send after its commits."""

    checked: int = 0
    exceeded: list[dict[str, Any]] = field(default_factory=list)
    suspended: list[str] = field(default_factory=list)
    dispatch: list[tuple[str, str, list[str]]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The run as JSON."""
        return {"checked": self.checked, "exceeded": self.exceeded, "suspended": self.suspended}


def _usage(session: Session, tenant_id: str, since: dt.datetime) -> tuple[float, float | None]:
    """Requests since ``since`` and the latest storage reading of a tenant."""
    requests = session.scalar(
        select(func.coalesce(func.sum(UsageRecord.value), 0.0)).where(
            UsageRecord.tenant_id == tenant_id,
            UsageRecord.metric == "requests",
            UsageRecord.window_start >= since,
        )
    )
    storage = session.scalars(
        select(UsageRecord.value)
        .where(UsageRecord.tenant_id == tenant_id, UsageRecord.metric == "storage_bytes")
        .order_by(UsageRecord.window_start.desc())
        .limit(1)
    ).first()
    return float(requests or 0.0), (float(storage) if storage is not None else None)


def _suspend(session: Session, tenant: Tenant, reason: str, result: Enforcement) -> str | None:
    run_id = start_tenant_workflow(session, tenant, wf.SUSPEND.kind, {"reason": reason})
    if run_id is not None:
        result.dispatch.append((run_id, Phase.FORWARD, wf.SUSPEND.forward_tasks))
        result.suspended.append(tenant.id)
    return run_id


def _claim(session: Session, key: str, tenant_id: str, result: dict[str, Any]) -> bool:
    """Insert the once-only key (flushed now, so a concurrent twin fails here)."""
    if session.get(Operation, key) is not None:
        return False
    session.add(Operation(key=key, task_name=ENFORCE, tenant_id=tenant_id, result=result))
    session.flush()
    return True


def _check_payment(session: Session, tenant: Tenant, now: dt.datetime, result: Enforcement) -> bool:
    """Suspend the tenant if its failed payment outlived the grace; whether it did."""
    payment = tenant.resources.get("payment")
    if not isinstance(payment, dict) or not payment_suspension_due(payment, now):
        return False
    key = f"{PAYMENT_KEY}:{tenant.id}:{payment.get('failed_at')}"
    unpaid = ", ".join(payment.get("unpaid_invoices", [])) or "unpaid invoice"
    reason = f"payment failed: {unpaid} unpaid past the grace period"
    if session.get(Operation, key) is not None:
        return False
    run_id = _suspend(session, tenant, reason, result)
    if run_id is None:
        return False  # busy: the next run tries again
    _claim(session, key, tenant.id, {"workflow_id": run_id, "reason": reason})
    tenant.resources = {
        **tenant.resources,
        "payment": {**payment, "status": PaymentStatus.SUSPENDED},
    }
    session.add(
        AuditEvent(
            tenant_id=tenant.id,
            kind="payment.grace_expired",
            data={"workflow_id": run_id, "reason": reason},
        )
    )
    return True


def _check_quota(
    session: Session, tenant: Tenant, plan: Plan, now: dt.datetime, result: Enforcement
) -> dict[str, Any] | None:
    """Apply the plan's policy if a quota is exceeded this period; the event data, if any."""
    settings = get_settings()
    start = period_start(tenant.billing_anchor, settings.billing_period, now)
    requests, storage = _usage(session, tenant.id, start)
    found = excesses(plan, requests=requests, storage_bytes=storage)
    resources = dict(tenant.resources)
    if not found:
        if resources.get("throttled") and resources.get("throttled_period") != start.isoformat():
            # A new period within quota: the throttle of an earlier period ends.
            resources.pop("throttled", None)
            resources.pop("throttled_period", None)
            tenant.resources = resources
            session.add(AuditEvent(tenant_id=tenant.id, kind="quota.throttle_lifted", data={}))
        return None
    key = f"{QUOTA_KEY}:{tenant.id}:{start.isoformat()}"
    if session.get(Operation, key) is not None:
        return None
    reason = quota_reason(found)
    data: dict[str, Any] = {
        "policy": plan.quota_policy,
        "plan": plan.name,
        "period_start": start.isoformat(),
        "reason": reason,
        "exceeded": [e.to_dict() for e in found],
    }
    if plan.quota_policy == "suspend":
        run_id = _suspend(session, tenant, reason, result)
        if run_id is None:
            return None  # busy: the key stays free and the next run tries again
        data["workflow_id"] = run_id
    elif plan.quota_policy == "throttle":
        tenant.resources = {**resources, "throttled": True, "throttled_period": start.isoformat()}
    _claim(session, key, tenant.id, data)
    session.add(AuditEvent(tenant_id=tenant.id, kind="quota.exceeded", data=data))
    return data


def enforce_quotas(
    *, tenant_ids: list[str] | None = None, now: dt.datetime | None = None
) -> Enforcement:
    """Check every active tenant (or ``tenant_ids``); the caller dispatches the suspensions."""
    now = now or utcnow()
    result = Enforcement()
    plans = load_catalog(get_settings().plans_file).plans
    with session_scope() as session:
        query = select(Tenant.id).where(Tenant.status == TenantStatus.ACTIVE).order_by(Tenant.id)
        if tenant_ids is not None:
            query = query.where(Tenant.id.in_(tenant_ids))
        ids = list(session.scalars(query))
    for tenant_id in ids:
        event: dict[str, Any] | None = None
        try:
            with session_scope() as session:
                tenant = session.get(Tenant, tenant_id)
                if tenant is None or tenant.status != TenantStatus.ACTIVE:
                    continue
                plan = plans.get(tenant.plan)
                result.checked += 1
                if _check_payment(session, tenant, now, result):
                    continue
                if plan is not None:
                    event = _check_quota(session, tenant, plan, now, result)
        except IntegrityError:
            # A concurrent run claimed the same key and applied the policy.
            log.info("quota_enforced_concurrently", tenant_id=tenant_id)
            continue
        if event is not None:
            result.exceeded.append({"tenant_id": tenant_id, **event})
            log.warning("quota_exceeded", tenant_id=tenant_id, reason=event["reason"])
            emit(
                "quota.exceeded",
                tenant_id=tenant_id,
                workflow_id=event.get("workflow_id"),
                subject=event["policy"],
                data=event,
            )
    return result


@app.task(name=ENFORCE, ignore_result=False)
def enforce(tenant_ids: list[str] | None = None) -> dict[str, Any]:
    """Apply quota policies and expired payment graces to active tenants."""
    result = enforce_quotas(tenant_ids=tenant_ids)
    for run_id, phase, tasks in result.dispatch:
        # After commit: a lost send is found by reconcile once the run's deadline passes.
        ledger.dispatch(app, run_id, phase, tasks)
    return result.summary()


def _tenant(session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFoundError(f"tenant {tenant_id!r} does not exist")
    return tenant


@public_task("cul8er.billing.payment_failed", PaymentFailed)
def payment_failed(session: Session, payload: PaymentFailed) -> Outcome:
    """Record a failed payment; the tenant is suspended when the grace period ends."""
    tenant = _tenant(session, payload.tenant_id)
    payment = record_payment_failure(
        tenant.resources.get("payment"),
        invoice_id=payload.invoice_id,
        now=utcnow(),
        grace=get_settings().payment_grace,
    )
    tenant.resources = {**tenant.resources, "payment": payment}
    session.add(
        AuditEvent(
            tenant_id=tenant.id,
            kind="payment.failed",
            data={"invoice_id": payload.invoice_id, "suspend_after": payment["suspend_after"]},
        )
    )
    return Outcome(
        data={
            "tenant_id": tenant.id,
            "payment": payment["status"],
            "suspend_after": payment["suspend_after"],
        },
        tenant_id=tenant.id,
    )


@public_task("cul8er.billing.payment_succeeded", PaymentSucceeded)
def payment_succeeded(session: Session, payload: PaymentSucceeded) -> Outcome:
    """Record a payment; a pending suspension for failed payments is called off."""
    tenant = _tenant(session, payload.tenant_id)
    payment = clear_payment(
        tenant.resources.get("payment"), invoice_id=payload.invoice_id, now=utcnow()
    )
    tenant.resources = {**tenant.resources, "payment": payment}
    session.add(
        AuditEvent(
            tenant_id=tenant.id,
            kind="payment.succeeded",
            data={"invoice_id": payload.invoice_id, "payment": payment["status"]},
        )
    )
    return Outcome(
        data={
            "tenant_id": tenant.id,
            "payment": payment["status"],
            # A tenant already suspended for non-payment is resumed by cul8er.tenants.resume.
            "tenant_status": tenant.status,
        },
        tenant_id=tenant.id,
    )
