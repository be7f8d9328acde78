"""Drift between the database and the platforms: what should run, and what does.

A missing (or stopped) instance of an active tenant is recreated (or started);
an instance carrying our labels whose tenant is gone is an orphan: reported,
and destroyed when ``prune`` is set. Beat runs it; ``cul8er platform reconcile``
runs it on demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import structlog
from sqlalchemy import select

from schemas.delivery import Release
from schemas.states import TenantStatus
from workers.economics.plans import get_plan
from workers.engine.instances import SHARED_TENANT_ID, instance_spec
from workers.engine.inventory import record_instance
from workers.pluginhost.handles import get_platform
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.errors import Cul8erError
from workers.runtime.models import AuditEvent, Instance, Tenant
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from schemas.platform import InstanceInfo
    from workers.pluginhost.contracts import Platform
    from workers.runtime.settings import Settings

__all__ = ["reconcile_platforms"]

log = structlog.get_logger(__name__)

#: Tenant states whose instances must exist (running or, when suspended, stopped).
LIVE: Final = (TenantStatus.ACTIVE, TenantStatus.SUSPENDED)
#: The lists of a reconcile report, each of ``{platform, instance, tenant_id}`` entries.
REPORT_KEYS: Final = ("recreated", "started", "orphans", "pruned", "errors")

_Report = dict[str, list[dict[str, Any]]]


class _TenantView(NamedTuple):
    """What reconciling needs of a tenant, read once at the start of a pass."""

    platform: str
    plan: str
    status: str
    #: The workflow that owns the tenant right now, if any.
    owner: str | None
    #: The release its instances run (``None``: the plan's image).
    release: Release | None = None


class _Recorded(NamedTuple):
    """An instance row: whose it is, and which of the tenant's instances."""

    tenant_id: str
    ordinal: int
    #: ``app``, or ``canary`` for a deployment's new instances (never recreated here).
    role: str = "app"


@dataclass(frozen=True)
class _OnePlatform:
    """One platform under reconciliation: what runs there, and what the database recorded."""

    name: str
    engine: Platform
    running: dict[str, InstanceInfo]
    recorded: dict[str, _Recorded]


def _audit(tenant_id: str | None, kind: str, data: dict[str, Any]) -> None:
    with session_scope() as session:
        session.add(AuditEvent(tenant_id=tenant_id, kind=kind, data=data))


@app.task(name="cul8er.platforms.reconcile")
def reconcile_platforms(prune: bool = False) -> _Report:
    """Bring every platform back in line with the database; returns what it found and did."""
    settings = get_settings()
    tenants, recorded = _read_database()
    drift = _Drift(settings=settings, tenants=tenants, prune=prune)
    in_use = {view.platform for view in tenants.values()} | {settings.default_platform}
    for platform_name in sorted(in_use):
        drift.reconcile(platform_name, recorded.get(platform_name, {}))
    if any(drift.report[key] for key in ("recreated", "started", "orphans")):
        log.warning("platform_drift", **{k: len(v) for k, v in drift.report.items()})
    return drift.report


def _read_database() -> tuple[dict[str, _TenantView], dict[str, dict[str, _Recorded]]]:
    """Every tenant's view by id, and the instance rows by platform, then instance name."""
    recorded: dict[str, dict[str, _Recorded]] = {}
    with session_scope() as session:
        tenants = {
            t.id: _TenantView(
                t.platform,
                t.plan,
                t.status,
                t.active_workflow_id,
                Release.model_validate(t.release) if t.release else None,
            )
            for t in session.scalars(select(Tenant))
        }
        rows = session.execute(
            select(
                Instance.tenant_id,
                Instance.name,
                Instance.ordinal,
                Instance.platform,
                Instance.role,
            )
        ).all()
    for tenant_id, name, ordinal, platform, role in rows:
        recorded.setdefault(platform, {})[name] = _Recorded(tenant_id, ordinal, role)
    return tenants, recorded


@dataclass
class _Drift:
    """One reconcile pass: the database's view, read once, and the report it fills."""

    settings: Settings
    tenants: dict[str, _TenantView]
    prune: bool
    report: _Report = field(default_factory=lambda: {key: [] for key in REPORT_KEYS})

    def reconcile(self, platform_name: str, recorded: dict[str, _Recorded]) -> None:
        """One platform: report (or prune) its orphans, then bring back the missing instances."""
        try:
            engine = get_platform(platform_name, self.settings)
            running = {info.name: info for info in engine.list_instances()}
        except Cul8erError as exc:
            self.report["errors"].append({"platform": platform_name, "error": str(exc)})
            return
        on = _OnePlatform(platform_name, engine, running, recorded)
        for name, info in running.items():
            if self._orphaned(on, name, info):
                self._report_orphan(on, name, info.tenant_id)
        for name, want in recorded.items():
            view = self.tenants[want.tenant_id]
            if view.status in LIVE and view.owner is None:
                self._restore(on, name, want, view)

    def _orphaned(self, on: _OnePlatform, name: str, info: InstanceInfo) -> bool:
        """Whether a running instance belongs to no tenant that wants it."""
        if info.tenant_id == SHARED_TENANT_ID:
            return False  # a shared pool: the shared_cluster provisioner owns it
        view = self.tenants.get(info.tenant_id)
        if view is None:
            return True
        if view.owner is not None or name in on.recorded:
            return False  # known, or its tenant is mid-workflow (rows not written yet)
        # Otherwise provisioning or deprovisioning: the workflow owns it.
        return view.status in LIVE or view.status == TenantStatus.FAILED

    def _report_orphan(self, on: _OnePlatform, name: str, tenant_id: str) -> None:
        """Report and audit an orphan; destroy it too when pruning."""
        orphan = {"platform": on.name, "instance": name, "tenant_id": tenant_id}
        self.report["orphans"].append(orphan)
        log.warning("instance_orphaned", **orphan)
        _audit(tenant_id, "platform.orphan_found", orphan)
        if self.prune:
            on.engine.destroy_instance(name)
            self.report["pruned"].append(orphan)
            _audit(tenant_id, "platform.orphan_pruned", orphan)

    def _restore(self, on: _OnePlatform, name: str, want: _Recorded, view: _TenantView) -> None:
        """Bring back one recorded instance of a live tenant; report and audit what it took."""
        entry = {"platform": on.name, "instance": name, "tenant_id": want.tenant_id}
        try:
            done = self._bring_back(on, name, want, view)
            if done is not None:
                self.report[done].append(entry)
                _audit(want.tenant_id, f"platform.instance_{done}", entry)
        except Cul8erError as exc:
            self.report["errors"].append({**entry, "error": str(exc)})

    def _bring_back(
        self, on: _OnePlatform, name: str, want: _Recorded, view: _TenantView
    ) -> str | None:
        """Recreate the instance if missing, start it if stopped while its tenant is active.

        ``"recreated"``, ``"started"``, or ``None`` when it already is as it should be.
        """
        found = on.running.get(name)
        if found is None and want.role != "app":
            return None  # a deployment's instance: the deployment keeps or removes it
        if found is None:
            plan = get_plan(view.plan, self.settings.plans_file)
            created = on.engine.create_instance(
                instance_spec(want.tenant_id, plan, on.name, want.ordinal, release=view.release)
            )
            if view.status == TenantStatus.SUSPENDED:
                on.engine.stop_instance(name)
                created = created.model_copy(update={"status": "stopped"})
            version = view.release.version if view.release is not None else None
            record_instance(
                want.tenant_id, created, role="app", ordinal=want.ordinal, release=version
            )
            return "recreated"
        if found.status != "running" and view.status == TenantStatus.ACTIVE:
            started = on.engine.start_instance(name)
            record_instance(want.tenant_id, started, role="app", ordinal=want.ordinal)
            return "started"
        return None
