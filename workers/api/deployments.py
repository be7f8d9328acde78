"""``/api/v1/deployments``: releases and plugin versions rolled out, approved, steered, undone.

Every change is the public task ``cul8er.deployments.<action>`` with the caller's subject as
the ``actor`` (so approvals and the audit trail name who asked). Who may deploy depends on
where: production needs an admin; a plugin developer deploys plugins to development and qa.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from schemas.states import Environment
from schemas.tasks import CreateDeployment
from workers.api.deps import Caller, IdempotencyKey, Writer
from workers.api.enqueue import call
from workers.api.problems import from_task_answer
from workers.api.roles import Action, Principal, authorize, visible_tenants
from workers.delivery.rows import summary
from workers.runtime.db import session_scope
from workers.runtime.errors import NotFoundError
from workers.runtime.models import Deployment, Tenant

__all__ = ["router"]

router = APIRouter(prefix="/deployments", tags=["deployments"])

#: From the least guarded environment to the most.
_ORDER = [e.value for e in Environment]


class Say(BaseModel):
    """A person's say on a deployment: why (kept in the audit trail)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    reason: Annotated[str, Field(max_length=500)] = ""


class Promotion(BaseModel):
    """End the current pause or gate; ``full``: go straight to the promotion."""

    model_config = ConfigDict(extra="forbid", strict=True)
    full: bool = False


def _answer(answer: dict[str, Any], status: int = 200) -> Response:
    if not answer.get("ok"):
        return from_task_answer(answer)
    headers = {}
    if answer.get("deployment_id"):
        headers["Location"] = f"/api/v1/deployments/{answer['deployment_id']}"
    return JSONResponse(answer, status_code=status, headers=headers)


def _environment_of(body: CreateDeployment) -> tuple[str, list[str] | None]:
    """Where a deployment would run (its most guarded environment) and its tenants, if named."""
    with session_scope() as session:
        if body.tenant_id is not None:
            tenant = session.get(Tenant, body.tenant_id)
            return (tenant.environment if tenant else Environment.DEVELOPMENT.value), [
                body.tenant_id
            ]
        if body.environment is not None:
            return str(body.environment), body.tenants
        query = select(Tenant.environment).distinct()
        if body.tenants is not None:
            query = query.where(Tenant.id.in_(body.tenants))
        found = [str(e) for e in session.scalars(query)]
    return max(found or [Environment.DEVELOPMENT.value], key=_ORDER.index), body.tenants


@router.post("", status_code=202, summary="Roll a release or a plugin version out")
def create(body: CreateDeployment, caller: Writer, key: IdempotencyKey = None) -> Response:
    """Create a deployment; it starts at once, or waits for approvers in production."""
    environment, tenants = _environment_of(body)
    named: list[str | None] = list(tenants) if tenants else [None]
    for tenant_id in named:
        authorize(
            caller,
            Action.DEPLOYMENT_WRITE,
            tenant_id=tenant_id,
            environment=environment,
            plugin_deployment=body.plugin is not None,
        )
    kwargs = body.model_dump(mode="json", exclude_none=True, exclude={"idempotency_key"})
    kwargs["actor"] = caller.subject
    return _answer(call("cul8er.deployments.create", kwargs, key=key, subject=caller.subject), 202)


def _row(caller: Principal, deployment_id: str) -> Deployment:
    with session_scope() as session:
        row = session.get(Deployment, deployment_id)
        if row is not None:
            session.expunge(row)
    seen = visible_tenants(caller)
    if row is None or (seen is not None and row.tenant_id not in seen):
        raise NotFoundError(f"deployment {deployment_id!r} does not exist")
    return row


@router.get("/{deployment_id}", summary="A deployment: stages, timeline, measurements")
def get(deployment_id: str, caller: Caller) -> Response:
    """Everything about one deployment."""
    row = _row(caller, deployment_id)
    authorize(caller, Action.DEPLOYMENT_READ, tenant_id=row.tenant_id)
    return _answer(call("cul8er.deployments.get", {"deployment_id": deployment_id}))


@router.get("", summary="Deployments, newest first")
def list_(
    caller: Caller,
    tenant_id: Annotated[str | None, Query(max_length=40)] = None,
    plugin: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """Deployments the caller may see."""
    authorize(caller, Action.DEPLOYMENT_READ, tenant_id=tenant_id)
    query = select(Deployment).order_by(Deployment.created_at.desc()).limit(limit)
    seen = visible_tenants(caller)
    if seen is not None:
        query = query.where(Deployment.tenant_id.in_(seen))
    for column, value in (
        (Deployment.tenant_id, tenant_id),
        (Deployment.plugin, plugin),
        (Deployment.status, status),
    ):
        if value is not None:
            query = query.where(column == value)
    with session_scope() as session:
        rows = list(session.scalars(query))
    return {"items": [summary(row) for row in rows]}


def _act(
    action: str, deployment_id: str, caller: Principal, *, key: str | None, **extra: Any
) -> Response:
    row = _row(caller, deployment_id)
    needed = (
        Action.DEPLOYMENT_APPROVE if action in ("approve", "reject") else Action.DEPLOYMENT_WRITE
    )
    authorize(
        caller,
        needed,
        tenant_id=row.tenant_id,
        environment=row.environment,
        plugin_deployment=row.plugin is not None,
    )
    kwargs: dict[str, Any] = {"deployment_id": deployment_id, "actor": caller.subject, **extra}
    return _answer(call(f"cul8er.deployments.{action}", kwargs, key=key, subject=caller.subject))


@router.post("/{deployment_id}/approve", summary="Approve a production deployment")
def approve(deployment_id: str, body: Say, caller: Writer, key: IdempotencyKey = None) -> Response:
    """One approver's approval (each subject once); it starts once enough agree."""
    return _act("approve", deployment_id, caller, key=key, reason=body.reason)


@router.post("/{deployment_id}/reject", summary="Refuse a production deployment")
def reject(deployment_id: str, body: Say, caller: Writer, key: IdempotencyKey = None) -> Response:
    """Refuse it before it starts."""
    return _act("reject", deployment_id, caller, key=key, reason=body.reason)


@router.post("/{deployment_id}/promote", summary="End the current pause or gate")
def promote(
    deployment_id: str, body: Promotion, caller: Writer, key: IdempotencyKey = None
) -> Response:
    """Promote now (``full``: skip every stage up to the promotion)."""
    return _act("promote", deployment_id, caller, key=key, full=body.full)


def _simple(action: str, summary: str) -> None:
    def route(
        deployment_id: str, body: Say, caller: Writer, key: IdempotencyKey = None
    ) -> Response:
        return _act(action, deployment_id, caller, key=key, reason=body.reason)

    route.__name__ = action
    route.__doc__ = summary
    router.post(f"/{{deployment_id}}/{action}", summary=summary)(route)


for _action, _summary in (
    ("pause", "Hold the deployment after its current stage"),
    ("resume", "Go on after a pause or an inconclusive gate"),
    ("abort", "Stop and roll back"),
    ("retry", "Run an aborted or rolled-back deployment again"),
    ("rollback", "Put back what a succeeded deployment replaced"),
):
    _simple(_action, _summary)
