"""``cul8er.health.sweep``: probe every active tenant's instances, record status changes.

An instance answering ``/health`` with 200 is ``running``, any other answer (or none)
``unhealthy``. Only changes are written, each with an audit event, and only while no
workflow owns the tenant: a workflow stopping or replacing instances knows better.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import structlog
from sqlalchemy import select, update

from schemas.states import TenantStatus
from workers.engine.instances import probe
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.models import AuditEvent, Instance, Tenant
from workers.runtime.schedule import claim_slot, slot_start
from workers.runtime.settings import get_settings

__all__ = ["SWEEP", "sweep", "sweep_once"]

log = structlog.get_logger(__name__)

SWEEP = "cul8er.health.sweep"
#: Probes in flight at once: each waits on the network, not the CPU.
PROBE_THREADS: Final = 16


@dataclass(frozen=True)
class _Target:
    instance_id: int
    tenant_id: str
    name: str
    endpoint: str | None
    status: str


def _probe(target: _Target, timeout: float) -> tuple[str, str]:
    if target.endpoint is None:
        return "unhealthy", "no endpoint"
    healthy, detail = probe(target.endpoint, timeout=timeout)
    return ("running" if healthy else "unhealthy"), detail[:200]


def _record(target: _Target, status: str, detail: str) -> bool:
    """Write the new status if nothing changed meanwhile; whether it was written."""
    with session_scope() as session:
        owner = session.execute(
            select(Tenant.status, Tenant.active_workflow_id).where(Tenant.id == target.tenant_id)
        ).first()
        if (
            owner is None
            or owner.status != TenantStatus.ACTIVE
            or owner.active_workflow_id is not None
        ):
            return False
        # Compare-and-set: a workflow (or another sweep) that changed the row wins.
        changed = session.execute(
            update(Instance)
            .where(Instance.id == target.instance_id, Instance.status == target.status)
            .values(status=status)
            .execution_options(synchronize_session=False)
        )
        if getattr(changed, "rowcount", 0) != 1:
            return False
        session.add(
            AuditEvent(
                tenant_id=target.tenant_id,
                kind="instance.status_changed",
                data={
                    "instance": target.name,
                    "from": target.status,
                    "to": status,
                    "detail": detail,
                },
            )
        )
    log.warning(
        "instance_status_changed",
        tenant_id=target.tenant_id,
        instance=target.name,
        old=target.status,
        new=status,
        detail=detail,
    )
    return True


def sweep_once() -> dict[str, Any]:
    """Probe every instance of every active tenant that no workflow owns; record changes."""
    settings = get_settings()
    with session_scope() as session:
        rows = session.execute(
            select(
                Instance.id, Instance.tenant_id, Instance.name, Instance.endpoint, Instance.status
            )
            .join(Tenant, Tenant.id == Instance.tenant_id)
            .where(Tenant.status == TenantStatus.ACTIVE, Tenant.active_workflow_id.is_(None))
            .order_by(Instance.tenant_id, Instance.name)
        ).all()
    targets = [_Target(*row) for row in rows]
    # Probes run outside any transaction: a slow instance never holds a database lock.
    with ThreadPoolExecutor(max_workers=PROBE_THREADS) as pool:
        results = list(pool.map(lambda t: _probe(t, settings.health_timeout), targets))
    changes = [
        {"tenant_id": t.tenant_id, "instance": t.name, "from": t.status, "to": status}
        for t, (status, detail) in zip(targets, results, strict=True)
        if status != t.status and _record(t, status, detail)
    ]
    unhealthy = sum(status == "unhealthy" for status, _ in results)
    return {"probed": len(targets), "unhealthy": unhealthy, "changes": changes}


@app.task(name=SWEEP, ignore_result=True)
def sweep() -> dict[str, Any]:
    """Probe every active tenant's instances once per slot (a second beat does nothing)."""
    slot = slot_start(get_settings().health_sweep_interval)
    if not claim_slot(SWEEP, slot):
        return {"slot": slot.isoformat(), "skipped": True}
    return {"slot": slot.isoformat(), "skipped": False, **sweep_once()}
