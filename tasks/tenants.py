"""The public tenant tasks: other services call these by name (docs/architecture.md §4)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from schemas.manifest import PluginType
from schemas.states import Phase, TenantStatus
from schemas.tasks import (
    ChangePlan,
    CreateTenant,
    DeprovisionTenant,
    GetTenant,
    ResumeTenant,
    SuspendTenant,
)
from tasks import workflows as wf
from workers.economics.plans import get_plan
from workers.engine import ledger
from workers.engine.public import Outcome, public_task
from workers.engine.views import describe_tenant
from workers.pluginhost.handles import plugin_names
from workers.runtime.errors import ConflictError, NotFoundError, ValidationFailedError
from workers.runtime.models import (
    AuditEvent,
    Instance,
    PlanPeriod,
    Tenant,
    WorkflowRun,
    utcnow,
)
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from workers.engine.workflow import Workflow

__all__: list[str] = []


def slugify(name: str) -> str:
    """A tenant id from a display name: ``"Acme Corp."`` → ``"acme-corp"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-")
    if slug and not slug[0].isalpha():
        slug = ("t-" + slug)[:40].strip("-")
    if not re.fullmatch(r"[a-z][a-z0-9-]{1,38}[a-z0-9]", slug):
        message = "cannot derive a tenant id from this name; pass tenant_id"
        raise ValidationFailedError(message, errors=[{"field": "name", "message": message}])
    return slug


def _field_error(field: str, message: str) -> ValidationFailedError:
    return ValidationFailedError(message, errors=[{"field": field, "message": message}])


def _start(
    session: Session,
    tenant: Tenant,
    workflow: Workflow,
    input: dict[str, Any],
    *,
    actor: str | None = None,
) -> Outcome:
    """Start ``workflow`` on ``tenant``, which it owns until the run ends (``actor``: who
    asked, for the audit trail)."""
    run = ledger.new_run(
        session,
        kind=workflow.kind,
        tenant_id=tenant.id,
        input=input,
        grace=get_settings().reconcile_grace,
    )
    tenant.active_workflow_id = run.id
    audit = {**input, "actor": actor} if actor else {**input}
    session.add(AuditEvent(tenant_id=tenant.id, kind=f"{workflow.kind}.requested", data=audit))
    return Outcome(
        data={"workflow_id": run.id, "tenant_id": tenant.id, "status": tenant.status},
        tenant_id=tenant.id,
        dispatch=[(run.id, Phase.FORWARD, workflow.forward_tasks)],
    )


def _owned(session: Session, tenant_id: str, *, allowed: tuple[str, ...], action: str) -> Tenant:
    """The tenant, if it exists, is in an ``allowed`` status and no run owns it."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFoundError(f"tenant {tenant_id!r} does not exist")
    if tenant.active_workflow_id is not None:
        raise ConflictError(
            f"tenant {tenant_id!r} is busy with workflow {tenant.active_workflow_id}; "
            f"{action} after it finishes"
        )
    if tenant.status not in allowed:
        raise ConflictError(
            f"cannot {action} tenant {tenant_id!r} in status {tenant.status!r} "
            f"(allowed: {', '.join(allowed)})"
        )
    return tenant


@public_task("cul8er.tenants.create", CreateTenant)
def create(session: Session, payload: CreateTenant) -> Outcome:
    """Sign a tenant up on a plan and start its provision workflow."""
    settings = get_settings()
    plan = get_plan(payload.plan, settings.plans_file)
    platform = payload.platform or settings.default_platform
    platforms = plugin_names(PluginType.PLATFORM, refresh=False)
    if platform not in platforms:
        raise _field_error(
            "platform", f"unknown platform {platform!r}; active: {', '.join(platforms)}"
        )
    provisioners = [
        name
        for name in plugin_names(PluginType.TENANT_PROVISIONER, refresh=False)
        if name != settings.data_provisioner
    ]
    if payload.provisioner not in (None, *provisioners):
        raise _field_error(
            "provisioner",
            f"unknown provisioner {payload.provisioner!r}; active: {', '.join(provisioners)}",
        )
    tenant_id = payload.tenant_id or slugify(payload.name)
    if tenant_id.startswith("shared-"):
        # Instance names ``t-shared-<platform>-…`` belong to the shared_cluster pools.
        raise _field_error("tenant_id", f"{tenant_id!r}: the prefix 'shared-' is reserved")
    if session.get(Tenant, tenant_id) is not None:
        raise ConflictError(f"tenant {tenant_id!r} exists already")
    now = utcnow()
    tenant = Tenant(
        id=tenant_id,
        name=payload.name,
        plan=plan.name,
        status=TenantStatus.PROVISIONING,
        platform=platform,
        placement=payload.provisioner or settings.default_provisioner,
        resources={},
        meta=dict(payload.metadata),
        environment=payload.environment,
        release={},
        billing_anchor=now.date(),
        generation=1,
        created_at=now,
        updated_at=now,
    )
    session.add(tenant)
    session.flush()  # surface a concurrent insert of the same id here, not at commit
    # Billing prices each part of a period on the plan of that part: the history starts here.
    session.add(PlanPeriod(tenant_id=tenant_id, plan=plan.name, start_at=now))
    return _start(session, tenant, wf.PROVISION, {"plan": plan.name}, actor=payload.actor)


@public_task("cul8er.tenants.change_plan", ChangePlan)
def change_plan(session: Session, payload: ChangePlan) -> Outcome:
    """Move a tenant to another plan; its instances follow the new limits."""
    plan = get_plan(payload.plan, get_settings().plans_file)
    tenant = _owned(
        session, payload.tenant_id, allowed=(TenantStatus.ACTIVE,), action="change the plan of"
    )
    if tenant.plan == plan.name:
        raise ConflictError(f"tenant {tenant.id!r} is on plan {plan.name!r} already")
    count = len(session.scalars(select(Instance.id).where(Instance.tenant_id == tenant.id)).all())
    if plan.max_instances is not None and count > plan.max_instances:
        raise ConflictError(
            f"tenant {tenant.id!r} runs {count} instances; plan {plan.name!r} allows "
            f"{plan.max_instances}"
        )
    return _start(
        session,
        tenant,
        wf.CHANGE_PLAN,
        {"plan": plan.name, "previous_plan": tenant.plan},
        actor=payload.actor,
    )


@public_task("cul8er.tenants.suspend", SuspendTenant)
def suspend(session: Session, payload: SuspendTenant) -> Outcome:
    """Stop a tenant's instances, keeping its data."""
    tenant = _owned(session, payload.tenant_id, allowed=(TenantStatus.ACTIVE,), action="suspend")
    return _start(session, tenant, wf.SUSPEND, {"reason": payload.reason}, actor=payload.actor)


@public_task("cul8er.tenants.resume", ResumeTenant)
def resume(session: Session, payload: ResumeTenant) -> Outcome:
    """Start a suspended tenant's instances again."""
    tenant = _owned(session, payload.tenant_id, allowed=(TenantStatus.SUSPENDED,), action="resume")
    return _start(session, tenant, wf.RESUME, {"reason": payload.reason}, actor=payload.actor)


@public_task("cul8er.tenants.deprovision", DeprovisionTenant)
def deprovision(session: Session, payload: DeprovisionTenant) -> Outcome:
    """Remove everything of a tenant and free its subnet."""
    tenant = _owned(
        session,
        payload.tenant_id,
        allowed=(TenantStatus.ACTIVE, TenantStatus.SUSPENDED, TenantStatus.FAILED),
        action="deprovision",
    )
    tenant.status = TenantStatus.DEPROVISIONING
    return _start(session, tenant, wf.DEPROVISION, {}, actor=payload.actor)


def latest_run(session: Session, tenant_id: str) -> WorkflowRun | None:
    """The tenant's most recent workflow run."""
    return session.scalars(
        select(WorkflowRun)
        .where(WorkflowRun.tenant_id == tenant_id)
        .order_by(WorkflowRun.created_at.desc())
        .limit(1)
    ).first()


@public_task("cul8er.tenants.get", GetTenant, idempotent=False)
def get(session: Session, payload: GetTenant) -> Outcome:
    """A tenant's status, plan, instances and subnet."""
    tenant = session.get(Tenant, payload.tenant_id)
    if tenant is None:
        raise NotFoundError(f"tenant {payload.tenant_id!r} does not exist")
    return Outcome(data=describe_tenant(session, tenant), tenant_id=tenant.id)
