"""Tenants and workflow runs as JSON: what ``cul8er.tenants.get`` and ``cul8er.workflows.status``
answer, read the same way by the CLI and the HTTP API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from workers.runtime.models import Instance, NetworkAllocation, StepRun, WorkerProcess

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from workers.runtime.models import Tenant, WorkflowRun

__all__ = ["describe_run", "describe_tenant"]


def describe_tenant(session: Session, tenant: Tenant) -> dict[str, Any]:
    """A tenant as JSON: status, plan, instances, subnet ."""
    subnet = session.scalars(
        select(NetworkAllocation.cidr).where(NetworkAllocation.tenant_id == tenant.id)
    ).first()
    instances = session.scalars(
        select(Instance).where(Instance.tenant_id == tenant.id).order_by(Instance.name)
    ).all()
    return {
        "tenant_id": tenant.id,
        "name": tenant.name,
        "plan": tenant.plan,
        "status": tenant.status,
        "status_reason": tenant.status_reason,
        "platform": tenant.platform,
        "placement": tenant.placement,
        "environment": tenant.environment,
        "release": tenant.release or None,
        #: The stable address of its load-balancer frontend (``None``: reach its instances).
        "entry": tenant.resources.get("entry"),
        "subnet": subnet,
        "generation": tenant.generation,
        "active_workflow_id": tenant.active_workflow_id,
        "metadata": tenant.meta,
        "resources": tenant.resources,
        "billing_anchor": tenant.billing_anchor.isoformat(),
        "created_at": tenant.created_at.isoformat(),
        "updated_at": tenant.updated_at.isoformat(),
        "instances": [
            {
                "name": i.name,
                "role": i.role,
                "status": i.status,
                "endpoint": i.endpoint,
                "platform": i.platform,
                "release": i.release,
                "limits": i.limits,
            }
            for i in instances
        ],
    }


def describe_run(session: Session, run: WorkflowRun) -> dict[str, Any]:
    """A run and its steps as JSON ."""
    steps = session.scalars(
        select(StepRun).where(StepRun.run_id == run.id).order_by(StepRun.id)
    ).all()
    owner_ids = {s.owner_id for s in steps if s.owner_id}
    owners = {
        w.boot_id: w
        for w in session.scalars(
            select(WorkerProcess).where(WorkerProcess.boot_id.in_(owner_ids))
        ).all()
    }
    return {
        "workflow_id": run.id,
        "kind": run.kind,
        "tenant_id": run.tenant_id,
        "status": run.status,
        "phase": run.phase,
        "current_step": run.current_step,
        "error": run.error,
        "created_at": run.created_at.isoformat(),
        "updated_at": run.updated_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "steps": [
            {
                "name": s.name,
                "phase": s.phase,
                "status": s.status,
                "attempts": s.attempts,
                "owner": _owner(s.owner_id, owners.get(s.owner_id or "")),
                "heartbeat_at": s.heartbeat_at.isoformat() if s.heartbeat_at else None,
                "takeovers": [h for h in s.history or [] if h.get("event") == "takeover"],
                "history": s.history or [],
                "output": s.output,
                "error": s.error,
                "started_at": s.started_at.isoformat() if s.started_at else None,
                "finished_at": s.finished_at.isoformat() if s.finished_at else None,
            }
            for s in steps
        ],
    }


def _owner(boot_id: str | None, worker: WorkerProcess | None) -> dict[str, Any] | None:
    if boot_id is None:
        return None
    if worker is None:
        return {"boot_id": boot_id, "node": None, "pid": None}
    return {"boot_id": boot_id, "node": worker.node, "pid": worker.pid}
