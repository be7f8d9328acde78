"""The steps of the tenant workflows. Each is idempotent: deterministic names, upserts.

Platform calls happen outside database transactions, so a slow engine never
holds a database lock.
"""

from __future__ import annotations

import ipaddress
import time
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from schemas.delivery import Release
from schemas.plugins import ProvisionRequest, ProvisionResult
from workers.delivery import traffic
from workers.economics.plans import get_plan
from workers.engine.events import emit
from workers.engine.instances import instance_name, instance_spec, wait_healthy
from workers.engine.inventory import record_instance
from workers.engine.steps import step
from workers.pluginhost.handles import get_platform, get_provisioner
from workers.runtime.db import session_scope
from workers.runtime.errors import ConfigError, NotFoundError, PoolExhaustedError, TransientError
from workers.runtime.models import (
    AuditEvent,
    Instance,
    NetworkAllocation,
    PlanPeriod,
    Tenant,
    utcnow,
)
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from workers.engine.workflow import StepContext
    from workers.pluginhost.contracts import Platform
from schemas.states import TenantStatus

__all__ = [
    "instance_name",
    "instance_spec",
    "record_instance",
    "record_plan_period",
    "wait_healthy",
]

log = structlog.get_logger(__name__)

#: Prefix length of the subnet each tenant gets.
TENANT_PREFIX = 24


def _tenant(session: Session, tenant_id: str | None) -> Tenant:
    tenant = session.get(Tenant, tenant_id) if tenant_id else None
    if tenant is None:
        raise NotFoundError(f"tenant {tenant_id!r} does not exist")
    return tenant


def _platform_of(ctx: StepContext) -> tuple[Platform, list[str]]:
    """The tenant's platform and the names of its instances, in order."""
    with session_scope() as session:
        tenant = _tenant(session, ctx.tenant_id)
        names = list(
            session.scalars(
                select(Instance.name)
                .where(Instance.tenant_id == tenant.id)
                .order_by(Instance.role, Instance.ordinal)
            )
        )
        platform_name = tenant.platform
    return get_platform(platform_name, get_settings()), names


def _set_status(
    tenant_id: str | None, run_id: str, status: str, *, reason: str | None = None, **changes: Any
) -> dict[str, Any]:
    """Move the tenant to ``status`` and release it from this run (idempotent)."""
    with session_scope() as session:
        tenant = _tenant(session, tenant_id)
        if tenant.active_workflow_id not in (run_id, None):
            # Another run owns the tenant now; this one must not overwrite it.
            return {"status": tenant.status, "skipped": True}
        if tenant.active_workflow_id == run_id or tenant.status != status:
            old = tenant.status
            tenant.status = status
            tenant.status_reason = reason
            tenant.active_workflow_id = None
            tenant.generation += 1
            for key, value in changes.items():
                setattr(tenant, key, value)
            session.add(
                AuditEvent(
                    tenant_id=tenant.id,
                    kind="tenant.status_changed",
                    data={"from": old, "to": status, "workflow_id": run_id, "reason": reason},
                )
            )
            log.info("tenant_status_changed", old=old, new=status)
            emit(
                "tenant.status_changed",
                tenant_id=tenant.id,
                workflow_id=run_id,
                data={"from": old, "to": status, "reason": reason},
            )
        return {"status": status}


# -- network ----------------------------------------------------------------------------------


@step("cul8er.tenants.allocate_network")
def allocate_network(ctx: StepContext) -> dict[str, Any]:
    """Give the tenant a /24 of the pool that no other tenant has."""
    settings = get_settings()
    pool = ipaddress.ip_network(settings.network_pool)
    if pool.prefixlen > TENANT_PREFIX:
        raise ConfigError(f"network pool {pool} is smaller than a /{TENANT_PREFIX}")
    try:
        with session_scope() as session:
            tenant = _tenant(session, ctx.tenant_id)
            held = session.scalars(
                select(NetworkAllocation.cidr).where(NetworkAllocation.tenant_id == tenant.id)
            ).first()
            if held is not None:
                return {"subnet": held}
            used = set(session.scalars(select(NetworkAllocation.cidr)))
            free = next(
                (str(n) for n in pool.subnets(new_prefix=TENANT_PREFIX) if str(n) not in used),
                None,
            )
            if free is None:
                total = 2 ** (TENANT_PREFIX - pool.prefixlen)
                raise PoolExhaustedError(
                    f"subnet pool {pool} is exhausted: all {total} /{TENANT_PREFIX} are allocated"
                )
            session.add(NetworkAllocation(cidr=free, tenant_id=tenant.id))
            tenant.resources = {**tenant.resources, "subnet": free}
    except IntegrityError as exc:
        # Another tenant took the same /24 at the same moment: try again for the next one.
        raise TransientError("subnet taken concurrently") from exc
    log.info("subnet_allocated", subnet=free)
    return {"subnet": free}


@step("cul8er.tenants.release_network")
def release_network(ctx: StepContext) -> dict[str, Any]:
    """Free the tenant's /24 for later tenants."""
    with session_scope() as session:
        released = session.scalars(
            delete(NetworkAllocation)
            .where(NetworkAllocation.tenant_id == ctx.tenant_id)
            .returning(NetworkAllocation.cidr)
        ).all()
        tenant = _tenant(session, ctx.tenant_id)
        tenant.resources = {k: v for k, v in tenant.resources.items() if k != "subnet"}
    return {"released": bool(released)}


# -- instances --------------------------------------------------------------------------------


def _compute(tenant: Tenant) -> str:
    """The tenant's compute provisioner: dedicated instances unless placed on a shared pool."""
    return tenant.placement or get_settings().default_provisioner


def _provision(ctx: StepContext, plan_name: str, *, scale: bool) -> dict[str, Any]:
    """Have the tenant's provisioner make (or rescale) its instances, and record them."""
    settings = get_settings()
    plan = get_plan(plan_name, settings.plans_file)
    with session_scope() as session:
        tenant = _tenant(session, ctx.tenant_id)
        tenant_id, platform_name, provisioner = tenant.id, tenant.platform, _compute(tenant)
        # An instance count set by autoscale (within the plan's max_instances) wins over the
        # plan's starting count.
        wanted = tenant.resources.get("instances")
        release = Release.model_validate(tenant.release) if tenant.release else None
    request = ProvisionRequest(
        tenant_id=tenant_id,
        plan=plan,
        platform=platform_name,
        instances=wanted if isinstance(wanted, int) else None,
        release=release,
    )
    handle = get_provisioner(provisioner)
    result: ProvisionResult = handle.scale(request) if scale else handle.provision(request)
    version = release.version if release is not None else None
    for info in result.instances:
        ordinal = int(info.name.rsplit("-", 1)[1])
        record_instance(tenant_id, info, role="app", ordinal=ordinal, release=version)
    destroyed = list(result.detail.get("destroyed", []))
    placement = {k: v for k, v in result.detail.items() if k not in ("created", "destroyed")}
    with session_scope() as session:
        if destroyed:
            session.execute(
                delete(Instance).where(
                    Instance.tenant_id == tenant_id, Instance.name.in_(destroyed)
                )
            )
        if placement:
            tenant = _tenant(session, tenant_id)
            tenant.resources = {
                **tenant.resources,
                "placement": {"provisioner": provisioner, **placement},
            }
    return {
        "provisioner": provisioner,
        "instances": [info.name for info in result.instances],
        "applied": {info.name: info.limits_applied for info in result.instances},
        "plan": plan_name,
    }


@step("cul8er.tenants.create_instances")
def create_instances(ctx: StepContext) -> dict[str, Any]:
    """The tenant's provisioner creates the plan's instances under deterministic names."""
    return _provision(ctx, ctx.input["plan"], scale=False)


@step("cul8er.tenants.destroy_instances")
def destroy_instances(ctx: StepContext) -> dict[str, Any]:
    """The tenant's provisioner removes every instance it holds for the tenant."""
    with session_scope() as session:
        tenant = _tenant(session, ctx.tenant_id)
        tenant_id, provisioner, platform = tenant.id, _compute(tenant), tenant.platform
        names = list(session.scalars(select(Instance.name).where(Instance.tenant_id == tenant_id)))
    ack = get_provisioner(provisioner).deprovision(tenant_id, platform=platform)
    with session_scope() as session:
        session.execute(delete(Instance).where(Instance.tenant_id == tenant_id))
        tenant = _tenant(session, tenant_id)
        tenant.resources = {k: v for k, v in tenant.resources.items() if k != "placement"}
    return {"destroyed": sorted(names), "detail": ack.detail}


@step("cul8er.tenants.apply_limits")
def apply_limits(ctx: StepContext) -> dict[str, Any]:
    """Bring the instances to the plan: CPU and memory limits live, the instance count.

    At sign-up ``create_instances`` of this run made them on this plan a moment before,
    and the run has owned the tenant since, so nothing can have moved them: the provisioner
    is not asked again (a scale lists every instance of the platform, which grows with the
    number of tenants). The health check that follows still finds an instance that died.
    """
    created = ctx.output_of("cul8er.tenants.create_instances")
    if created.get("plan") == ctx.input["plan"]:
        return {**created, "unchanged": True}
    return _provision(ctx, ctx.input["plan"], scale=True)


@step("cul8er.tenants.restore_limits")
def restore_limits(ctx: StepContext) -> dict[str, Any]:
    """Put the previous plan's limits back after a failed plan change."""
    return _provision(ctx, ctx.input["previous_plan"], scale=True)


@step("cul8er.tenants.stop_instances")
def stop_instances(ctx: StepContext) -> dict[str, Any]:
    """Stop every instance, keeping its data."""
    platform, names = _platform_of(ctx)
    for name in names:
        platform.stop_instance(name)
    with session_scope() as session:
        for row in session.scalars(select(Instance).where(Instance.tenant_id == ctx.tenant_id)):
            row.status, row.endpoint = "stopped", None
    return {"stopped": names}


@step("cul8er.tenants.start_instances")
def start_instances(ctx: StepContext) -> dict[str, Any]:
    """Start every instance again (its endpoint may change)."""
    platform, names = _platform_of(ctx)
    for name in names:
        info = platform.start_instance(name)
        record_instance(ctx.tenant_id or "", info, role="app", ordinal=int(name.rsplit("-", 1)[1]))
    return {"started": names}


# -- data store -------------------------------------------------------------------------------


@step("cul8er.tenants.create_datastore")
def create_datastore(ctx: StepContext) -> dict[str, Any]:
    """The data provisioner creates the tenant's own database (schema, database or file)."""
    settings = get_settings()
    with session_scope() as session:
        tenant = _tenant(session, ctx.tenant_id)
        request = ProvisionRequest(
            tenant_id=tenant.id,
            plan=get_plan(tenant.plan, settings.plans_file),
            platform=tenant.platform,
        )
    store = get_provisioner(settings.data_provisioner).provision(request).datastore
    with session_scope() as session:
        tenant = _tenant(session, ctx.tenant_id)
        tenant.resources = {**tenant.resources, "datastore": store}
    return {"datastore": store}


@step("cul8er.tenants.drop_datastore")
def drop_datastore(ctx: StepContext) -> dict[str, Any]:
    """The data provisioner drops the tenant's database and everything in it."""
    get_provisioner(get_settings().data_provisioner).deprovision(ctx.tenant_id or "")
    with session_scope() as session:
        tenant = _tenant(session, ctx.tenant_id)
        tenant.resources = {k: v for k, v in tenant.resources.items() if k != "datastore"}
    return {"dropped": True}


# -- health -----------------------------------------------------------------------------------


@step("cul8er.tenants.health_check")
def health_check(ctx: StepContext) -> dict[str, Any]:
    """Every instance answers ``/health`` with 200, or the step retries."""
    settings = get_settings()
    with session_scope() as session:
        rows = session.execute(
            select(Instance.name, Instance.endpoint).where(Instance.tenant_id == ctx.tenant_id)
        ).all()
    # One window for the whole tenant: a slow first instance leaves less time to the rest.
    deadline = time.monotonic() + settings.health_window
    for name, endpoint in rows:
        if not endpoint:
            raise TransientError(f"instance {name} is not healthy: no endpoint")
        wait_healthy(
            name,
            endpoint,
            timeout=max(0.0, deadline - time.monotonic()),
            probe_timeout=settings.health_timeout,
        )
    return {"instances": dict.fromkeys((name for name, _ in rows), "healthy")}


# -- entry point ------------------------------------------------------------------------------


@step("cul8er.tenants.sync_entry")
def sync_entry(ctx: StepContext) -> dict[str, Any]:
    """The tenant's stable entry point on the load balancer serves its running instances."""
    return traffic.sync(ctx.tenant_id or "")


@step("cul8er.tenants.remove_entry")
def remove_entry(ctx: StepContext) -> dict[str, Any]:
    """The tenant's entry point goes from the load balancer."""
    return traffic.forget(ctx.tenant_id or "")


# -- status -----------------------------------------------------------------------------------


@step("cul8er.tenants.activate")
def activate(ctx: StepContext) -> dict[str, Any]:
    """The tenant is provisioned: active."""
    return _set_status(ctx.tenant_id, ctx.run_id, TenantStatus.ACTIVE)


@step("cul8er.tenants.mark_active")
def mark_active(ctx: StepContext) -> dict[str, Any]:
    """The tenant runs again: active."""
    return _set_status(ctx.tenant_id, ctx.run_id, TenantStatus.ACTIVE)


@step("cul8er.tenants.mark_suspended")
def mark_suspended(ctx: StepContext) -> dict[str, Any]:
    """The tenant's instances are stopped: suspended."""
    return _set_status(
        ctx.tenant_id, ctx.run_id, TenantStatus.SUSPENDED, reason=ctx.input.get("reason") or None
    )


def record_plan_period(session: Session, tenant_id: str, plan: str) -> None:
    """Close the tenant's open plan period and open one on ``plan`` (nothing if already on it)."""
    now = utcnow()
    current = session.scalars(
        select(PlanPeriod).where(PlanPeriod.tenant_id == tenant_id, PlanPeriod.end_at.is_(None))
    ).first()
    if current is not None and current.plan == plan:
        return
    if current is not None:
        current.end_at = now
    session.add(PlanPeriod(tenant_id=tenant_id, plan=plan, start_at=now))


@step("cul8er.tenants.commit_plan")
def commit_plan(ctx: StepContext) -> dict[str, Any]:
    """The new plan's limits hold and the instances are healthy: record the plan."""
    with session_scope() as session:
        tenant = _tenant(session, ctx.tenant_id)
        status = tenant.status
        record_plan_period(session, tenant.id, ctx.input["plan"])
    return {
        **_set_status(ctx.tenant_id, ctx.run_id, status, plan=ctx.input["plan"]),
        "plan": ctx.input["plan"],
    }


@step("cul8er.tenants.mark_terminated")
def mark_terminated(ctx: StepContext) -> dict[str, Any]:
    """Everything of the tenant is gone: terminated, and its plan period ends (billing)."""
    with session_scope() as session:
        # The last period is billed up to now; a repeated delivery finds it closed already.
        for period in session.scalars(
            select(PlanPeriod).where(
                PlanPeriod.tenant_id == ctx.tenant_id, PlanPeriod.end_at.is_(None)
            )
        ):
            period.end_at = utcnow()
    return _set_status(ctx.tenant_id, ctx.run_id, TenantStatus.TERMINATED)


def _error_text(ctx: StepContext) -> str:
    error = ctx.error or {}
    return f"{error.get('step', '?')}: {error.get('message', 'unknown error')}"[:1000]


@step("cul8er.tenants.mark_failed")
def mark_failed(ctx: StepContext) -> dict[str, Any]:
    """After compensation: the tenant is failed, with the error as its reason."""
    return _set_status(ctx.tenant_id, ctx.run_id, TenantStatus.FAILED, reason=_error_text(ctx))


@step("cul8er.tenants.release_tenant")
def release_tenant(ctx: StepContext) -> dict[str, Any]:
    """After a failed change: the tenant keeps its status, with the error as its reason."""
    with session_scope() as session:
        tenant = _tenant(session, ctx.tenant_id)
        status = tenant.status
        if tenant.active_workflow_id == ctx.run_id:
            tenant.active_workflow_id = None
            tenant.status_reason = _error_text(ctx)
    return {"status": status, "error": ctx.error}
