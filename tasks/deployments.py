"""Deployments as tasks: the public ``cul8er.deployments.*`` and the steps that carry them.

See docs/architecture.md §10. A deployment is one ledger run of the ``deployment``
workflow: ``advance`` runs the strategy's stages; when it fails (a gate, an abort, an
engine that stays away) the ledger runs ``roll_back``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from schemas.tasks import (
    CreateDeployment,
    DeploymentAction,
    GetDeployment,
    ListDeployments,
    PromoteDeployment,
    SetEnvironment,
)
from workers.delivery import commands, stages
from workers.engine import ledger
from workers.engine.public import Outcome, public_task
from workers.engine.steps import step
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.errors import NotFoundError
from workers.runtime.models import AuditEvent, Deployment, Tenant
from workers.runtime.task import RetryingTask

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from workers.engine.workflow import StepContext

__all__: list[str] = []


# -- public tasks -----------------------------------------------------------------------------


@public_task("cul8er.deployments.create", CreateDeployment, prepare=commands.plan)
def create(session: Session, planned: commands.Planned) -> Outcome:
    """Roll a release over a tenant's instances with a strategy."""
    return commands.create(session, planned)


@public_task("cul8er.deployments.approve", DeploymentAction)
def approve(session: Session, payload: DeploymentAction) -> Outcome:
    """Approve a production deployment; it starts once enough approvers agree."""
    return commands.approve(session, payload)


@public_task("cul8er.deployments.reject", DeploymentAction)
def reject(session: Session, payload: DeploymentAction) -> Outcome:
    """Refuse a production deployment before it starts."""
    return commands.reject(session, payload)


@public_task("cul8er.deployments.promote", PromoteDeployment)
def promote(session: Session, payload: PromoteDeployment) -> Outcome:
    """End the current pause or gate (``full``: go straight to promotion)."""
    return commands.promote(session, payload)


@public_task("cul8er.deployments.pause", DeploymentAction)
def pause(session: Session, payload: DeploymentAction) -> Outcome:
    """Hold a deployment after its current stage."""
    return commands.pause(session, payload)


@public_task("cul8er.deployments.resume", DeploymentAction)
def resume(session: Session, payload: DeploymentAction) -> Outcome:
    """Go on after a pause or an inconclusive analysis."""
    return commands.resume(session, payload)


@public_task("cul8er.deployments.abort", DeploymentAction)
def abort(session: Session, payload: DeploymentAction) -> Outcome:
    """Stop a deployment and roll it back."""
    return commands.abort(session, payload)


@public_task("cul8er.deployments.retry", DeploymentAction)
def retry(session: Session, payload: DeploymentAction) -> Outcome:
    """Run an aborted, rolled-back or failed deployment again."""
    return commands.retry(session, payload)


@public_task("cul8er.deployments.rollback", DeploymentAction, prepare=commands.plan_rollback)
def rollback(session: Session, planned: commands.Planned) -> Outcome:
    """Put the previous release back after a completed promotion."""
    return commands.rollback(session, planned)


@public_task("cul8er.deployments.get", GetDeployment, idempotent=False)
def get(session: Session, payload: GetDeployment) -> Outcome:
    """A deployment with its stages, timeline, measurements and approvals."""
    row = session.get(Deployment, payload.deployment_id)
    if row is None:
        raise NotFoundError(f"deployment {payload.deployment_id!r} does not exist")
    return Outcome(data=commands.describe(session, row), tenant_id=row.tenant_id)


@public_task("cul8er.deployments.list", ListDeployments, idempotent=False)
def list_(session: Session, payload: ListDeployments) -> Outcome:
    """Deployments, newest first."""
    return Outcome(data={"deployments": commands.list_deployments(session, payload)})


@public_task("cul8er.tenants.set_environment", SetEnvironment)
def set_environment(session: Session, payload: SetEnvironment) -> Outcome:
    """Move a tenant to development, qa or production (its next deployments follow)."""
    tenant = session.get(Tenant, payload.tenant_id)
    if tenant is None:
        raise NotFoundError(f"tenant {payload.tenant_id!r} does not exist")
    old = tenant.environment
    if old != payload.environment:
        tenant.environment = payload.environment
        tenant.generation += 1
        session.add(
            AuditEvent(
                tenant_id=tenant.id,
                kind="tenant.environment_changed",
                data={"from": old, "to": payload.environment.value},
            )
        )
    return Outcome(
        data={"tenant_id": tenant.id, "environment": tenant.environment, "previous": old},
        tenant_id=tenant.id,
    )


# -- steps ------------------------------------------------------------------------------------


@step("cul8er.deployments.advance")
def advance(ctx: StepContext) -> dict[str, Any]:
    """Carry the deployment's stages out from where it stands; park while it waits."""
    return stages.advance(ctx.input["deployment_id"], ctx.run_id)


@step("cul8er.deployments.roll_back")
def roll_back(ctx: StepContext) -> dict[str, Any]:
    """Traffic to stable, the new release's instances gone; the deployment ends."""
    return stages.roll_back(ctx.input["deployment_id"], ctx.run_id, ctx.error)


# -- beat -------------------------------------------------------------------------------------


@app.task(name="cul8er.deployments.expire_approvals", base=RetryingTask)
def expire_approvals() -> dict[str, Any]:
    """Refuse production deployments whose approval window passed."""
    with session_scope() as session:
        expired, send = commands.expire_approvals(session)
    for run_id, phase, tasks in send:
        ledger.dispatch(app, run_id, phase, tasks)
    return {"expired": expired}
