"""``/api/v1/tenants``: sign tenants up, read, list, change plan, suspend, resume, delete.

Writes send the public task and answer ``202 Accepted`` with the workflow it started and a
``Location`` to poll (``?wait=SECONDS`` waits for its end: ``200`` when it ended in time).
Reads answer what ``cul8er.tenants.get`` would, read from the database here (a read needs no
worker); lists are scoped to what the caller's token may see.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from schemas.tasks import CreateTenant
from workers.api.deps import Caller, IdempotencyKey, Writer
from workers.api.enqueue import call, wait_for_workflow
from workers.api.problems import from_task_answer
from workers.api.roles import Action, authorize, visible_tenants
from workers.engine.views import describe_tenant
from workers.runtime.db import session_scope
from workers.runtime.errors import NotFoundError
from workers.runtime.models import Tenant

__all__ = ["router", "started"]

router = APIRouter(prefix="/tenants", tags=["tenants"])

Wait = Annotated[float, Query(ge=0, le=300, description="Seconds to wait for the workflow.")]
#: A write with ``?wait=`` whose workflow ended in time answers its status with ``200``.
WAITED: dict[int | str, dict[str, Any]] = {
    200: {"description": "The workflow ended within ?wait= seconds: its status and steps"}
}


class PlanChange(BaseModel):
    """The plan a tenant moves to."""

    model_config = ConfigDict(extra="forbid", strict=True)
    plan: Annotated[str, Field(min_length=1, max_length=64)]


class Suspension(BaseModel):
    """Why a tenant is suspended (kept on the tenant and in the audit trail)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    reason: Annotated[str, Field(max_length=500)] = ""


def started(answer: dict[str, Any], wait: float) -> Response:
    """A write's answer: the problem it met, or ``202`` with the workflow to poll."""
    if not answer.get("ok"):
        return from_task_answer(answer)
    workflow_id = answer.get("workflow_id")
    location = f"/api/v1/workflows/{workflow_id}" if workflow_id else None
    headers = {"Location": location} if location else {}
    if workflow_id and wait > 0:
        view = wait_for_workflow(str(workflow_id), wait)
        if view.get("ok") and view.get("status") in ("succeeded", "failed"):
            return JSONResponse(view, status_code=200, headers=headers)
    return JSONResponse(answer, status_code=202, headers=headers)


@router.post("", status_code=202, summary="Sign a tenant up and provision it", responses=WAITED)
def create_tenant(
    body: CreateTenant, caller: Writer, key: IdempotencyKey = None, wait: Wait = 0
) -> Response:
    """Create a tenant on a plan: ``202`` with the provision workflow (``Location``)."""
    authorize(caller, Action.TENANT_WRITE)
    kwargs = body.model_dump(mode="json", exclude_none=True, exclude={"idempotency_key"})
    kwargs["actor"] = caller.subject
    return started(call("cul8er.tenants.create", kwargs, key=key, subject=caller.subject), wait)


@router.get("/{tenant_id}", summary="A tenant: status, plan, entry point, release, instances")
def get_tenant(tenant_id: str, caller: Caller) -> Response:
    """One tenant, as ``cul8er.tenants.get`` answers it."""
    authorize(caller, Action.TENANT_READ, tenant_id=tenant_id)
    with session_scope() as session:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None:
            raise NotFoundError(f"tenant {tenant_id!r} does not exist")
        # What cul8er.tenants.get answers, read here: a read needs no round trip to a worker.
        return JSONResponse({"ok": True, **describe_tenant(session, tenant)})


@router.get("", summary="Tenants, by id, a page at a time")
def list_tenants(
    caller: Caller,
    status: Annotated[str | None, Query(max_length=32)] = None,
    plan: Annotated[str | None, Query(max_length=64)] = None,
    environment: Annotated[str | None, Query(max_length=32)] = None,
    after: Annotated[str | None, Query(max_length=40, description="The last id seen.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """Tenants the caller may see, filtered; ``next`` is the ``after`` of the next page."""
    authorize(caller, Action.TENANT_READ)
    query = select(Tenant).order_by(Tenant.id).limit(limit + 1)
    seen = visible_tenants(caller)
    if seen is not None:
        query = query.where(Tenant.id.in_(seen))
    for column, value in ((Tenant.status, status), (Tenant.plan, plan)):
        if value is not None:
            query = query.where(column == value)
    if environment is not None:
        query = query.where(Tenant.environment == environment)
    if after is not None:
        query = query.where(Tenant.id > after)
    with session_scope() as session:
        rows = list(session.scalars(query))
    items = [_summary(t) for t in rows[:limit]]
    return {"items": items, "next": items[-1]["tenant_id"] if len(rows) > limit else None}


def _summary(tenant: Tenant) -> dict[str, Any]:
    return {
        "tenant_id": tenant.id,
        "name": tenant.name,
        "plan": tenant.plan,
        "status": tenant.status,
        "environment": tenant.environment,
        "platform": tenant.platform,
        "created_at": tenant.created_at.isoformat(),
    }


@router.post(
    "/{tenant_id}/plan", status_code=202, summary="Move a tenant to another plan", responses=WAITED
)
def change_plan(
    tenant_id: str, body: PlanChange, caller: Writer, key: IdempotencyKey = None, wait: Wait = 0
) -> Response:
    """Change the tenant's plan; its resources follow."""
    authorize(caller, Action.TENANT_WRITE, tenant_id=tenant_id)
    payload = {"tenant_id": tenant_id, "plan": body.plan, "actor": caller.subject}
    return started(
        call("cul8er.tenants.change_plan", payload, key=key, subject=caller.subject), wait
    )


@router.post(
    "/{tenant_id}/suspend",
    status_code=202,
    summary="Stop a tenant, keeping its data",
    responses=WAITED,
)
def suspend(
    tenant_id: str, body: Suspension, caller: Writer, key: IdempotencyKey = None, wait: Wait = 0
) -> Response:
    """Suspend the tenant."""
    authorize(caller, Action.TENANT_WRITE, tenant_id=tenant_id)
    payload = {"tenant_id": tenant_id, "reason": body.reason, "actor": caller.subject}
    return started(call("cul8er.tenants.suspend", payload, key=key, subject=caller.subject), wait)


@router.post(
    "/{tenant_id}/resume",
    status_code=202,
    summary="Start a suspended tenant again",
    responses=WAITED,
)
def resume(tenant_id: str, caller: Writer, key: IdempotencyKey = None, wait: Wait = 0) -> Response:
    """Resume the tenant."""
    authorize(caller, Action.TENANT_WRITE, tenant_id=tenant_id)
    payload = {"tenant_id": tenant_id, "actor": caller.subject}
    return started(call("cul8er.tenants.resume", payload, key=key, subject=caller.subject), wait)


@router.delete("/{tenant_id}", status_code=202, summary="Deprovision a tenant", responses=WAITED)
def delete(tenant_id: str, caller: Writer, key: IdempotencyKey = None, wait: Wait = 0) -> Response:
    """Deprovision the tenant: everything goes, its subnet is freed."""
    authorize(caller, Action.TENANT_WRITE, tenant_id=tenant_id)
    payload = {"tenant_id": tenant_id, "actor": caller.subject}
    return started(
        call("cul8er.tenants.deprovision", payload, key=key, subject=caller.subject), wait
    )
