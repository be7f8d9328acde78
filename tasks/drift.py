"""Drift between the database and the platforms: what should run, and what does.

A missing (or stopped) instance of an active tenant is recreated (or started);
an instance carrying our labels whose tenant is gone is an orphan: reported,
and destroyed when ``prune`` is set. Beat runs it; ``cul8er platform reconcile``
runs it on demand.
"""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import select

from tasks.steps import record_instance
from workers.economics.plans import get_plan
from workers.engine.instances import SHARED_TENANT_ID, instance_spec
from workers.pluginhost.handles import get_platform
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.errors import Cul8erError
from workers.runtime.models import AuditEvent, Instance, Tenant
from workers.runtime.settings import get_settings

__all__ = ["reconcile_platforms"]

log = structlog.get_logger(__name__)

#: Tenant states whose instances must exist (running or, when suspended, stopped).
LIVE = ("active", "suspended")


def _audit(tenant_id: str | None, kind: str, data: dict[str, Any]) -> None:
    with session_scope() as session:
        session.add(AuditEvent(tenant_id=tenant_id, kind=kind, data=data))


@app.task(name="cul8er.platforms.reconcile", acks_late=True)
def reconcile_platforms(prune: bool = False) -> dict[str, Any]:
    """Bring every platform back in line with the database; returns what it found and did."""
    settings = get_settings()
    report: dict[str, list[dict[str, Any]]] = {
        "recreated": [],
        "started": [],
        "orphans": [],
        "pruned": [],
        "errors": [],
    }
    with session_scope() as session:
        tenants = {t.id: t for t in session.scalars(select(Tenant))}
        rows = session.execute(
            select(Instance.tenant_id, Instance.name, Instance.ordinal, Instance.platform)
        ).all()
        views = {
            t.id: (t.platform, t.plan, t.status, t.active_workflow_id) for t in tenants.values()
        }
    in_use = {platform for platform, *_ in views.values()} | {settings.default_platform}
    for platform_name in sorted(in_use):
        try:
            platform = get_platform(platform_name, settings)
            running = {info.name: info for info in platform.list_instances()}
        except Cul8erError as exc:
            report["errors"].append({"platform": platform_name, "error": str(exc)})
            continue
        expected = {name: (tid, ordinal) for tid, name, ordinal, pf in rows if pf == platform_name}
        for name, info in running.items():
            if info.tenant_id == SHARED_TENANT_ID:
                continue  # a shared pool: the shared_cluster provisioner owns it
            view = views.get(info.tenant_id)
            if view is not None and (view[3] is not None or name in expected):
                continue  # known, or its tenant is mid-workflow (rows not written yet)
            if view is not None and view[2] not in LIVE and view[2] != "failed":
                continue  # provisioning or deprovisioning: the workflow owns it
            orphan = {"platform": platform_name, "instance": name, "tenant_id": info.tenant_id}
            report["orphans"].append(orphan)
            log.warning("instance_orphaned", **orphan)
            _audit(info.tenant_id, "platform.orphan_found", orphan)
            if prune:
                platform.destroy_instance(name)
                report["pruned"].append(orphan)
                _audit(info.tenant_id, "platform.orphan_pruned", orphan)
        for name, (tenant_id, ordinal) in expected.items():
            _, plan_name, status, owner = views[tenant_id]
            if status not in LIVE or owner is not None:
                continue
            found = running.get(name)
            entry = {"platform": platform_name, "instance": name, "tenant_id": tenant_id}
            try:
                if found is None:
                    plan = get_plan(plan_name, settings.plans_file)
                    created = platform.create_instance(
                        instance_spec(tenant_id, plan, platform_name, ordinal)
                    )
                    if status == "suspended":
                        platform.stop_instance(name)
                        created = created.model_copy(update={"status": "stopped"})
                    record_instance(tenant_id, created, role="app", ordinal=ordinal)
                    report["recreated"].append(entry)
                    _audit(tenant_id, "platform.instance_recreated", entry)
                elif found.status != "running" and status == "active":
                    record_instance(
                        tenant_id, platform.start_instance(name), role="app", ordinal=ordinal
                    )
                    report["started"].append(entry)
                    _audit(tenant_id, "platform.instance_started", entry)
            except Cul8erError as exc:
                report["errors"].append({**entry, "error": str(exc)})
    if any(report[key] for key in ("recreated", "started", "orphans")):
        log.warning("platform_drift", **{k: len(v) for k, v in report.items()})
    return report
