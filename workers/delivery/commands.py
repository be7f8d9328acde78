"""What people and services ask of deployments: create, approve, promote, abort, …

See docs/architecture.md §10. Each function runs inside a public task's transaction and
answers an ``Outcome``; runs to send go out after the commit. Requests that a running
deployment must act on (pause, promote, abort) are written to the deployment's
``requests`` and the step is woken at once (``ledger.wake``), so they take effect in
well under a second, never at the next tick.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from schemas.delivery import Release
from schemas.manifest import PluginType
from schemas.plugins import DeploymentSpec
from schemas.states import (
    DEPLOYMENT_OPEN,
    DeploymentStatus,
    Environment,
    Phase,
    TenantStatus,
)
from schemas.tasks import CreateDeployment
from workers.delivery import plugin_commands, traffic
from workers.delivery.rows import (
    WORKFLOW,
    Planned,
    add_timeline,
    audit,
    field_error,
    summary,
)
from workers.engine import ledger
from workers.engine.events import emit
from workers.engine.public import Outcome
from workers.pluginhost.handles import get_strategy, plugin_names
from workers.runtime.db import session_scope
from workers.runtime.errors import (
    ConflictError,
    NotFoundError,
)
from workers.runtime.models import (
    Approval,
    Deployment,
    Instance,
    Tenant,
    utcnow,
)
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from schemas.tasks import (
        DeploymentAction,
        ListDeployments,
        PromoteDeployment,
    )

__all__ = [
    "Planned",
    "WORKFLOW",
    "abort",
    "approve",
    "count_open",
    "create",
    "describe",
    "expire_approvals",
    "list_deployments",
    "pause",
    "plan",
    "plan_rollback",
    "promote",
    "reject",
    "resume",
    "retry",
    "rollback",
    "summary",
]

_RETRYABLE = (DeploymentStatus.ABORTED, DeploymentStatus.ROLLED_BACK, DeploymentStatus.FAILED)


def _get(session: Session, deployment_id: str) -> Deployment:
    row = session.get(Deployment, deployment_id, with_for_update=True)
    if row is None:
        raise NotFoundError(f"deployment {deployment_id!r} does not exist")
    return row


def _open_for(session: Session, tenant_id: str) -> Deployment | None:
    return session.scalars(
        select(Deployment)
        .where(Deployment.tenant_id == tenant_id, Deployment.status.in_(DEPLOYMENT_OPEN))
        .order_by(Deployment.created_at)
        .limit(1)
    ).first()


def _start(session: Session, row: Deployment, tenant: Tenant) -> Outcome:
    """Hand the deployment to a fresh ledger run, which owns the tenant until it ends."""
    if tenant.active_workflow_id is not None:
        raise ConflictError(
            f"tenant {tenant.id!r} is busy with workflow {tenant.active_workflow_id}; "
            "deploy after it finishes"
        )
    if tenant.status != TenantStatus.ACTIVE:
        raise ConflictError(
            f"tenant {tenant.id!r} is {tenant.status}: only an active tenant deploys"
        )
    run = ledger.new_run(
        session,
        kind=WORKFLOW,
        tenant_id=tenant.id,
        input={"deployment_id": row.id},
        grace=get_settings().reconcile_grace,
    )
    tenant.active_workflow_id = run.id
    row.workflow_id = run.id
    row.status = DeploymentStatus.PROGRESSING
    row.reason = None
    add_timeline(row, "started", workflow_id=run.id)
    emit(
        "deployment.started",
        tenant_id=tenant.id,
        workflow_id=run.id,
        subject=row.id,
        data={"deployment_id": row.id, "version": row.release.get("version")},
    )
    return Outcome(
        data=summary(row),
        tenant_id=tenant.id,
        dispatch=[(run.id, Phase.FORWARD, ledger.pending_tasks(session, run.id, Phase.FORWARD))],
    )


# -- create -----------------------------------------------------------------------------------


def plan(payload: CreateDeployment, *, rollback_of: str | None = None) -> Planned:
    """Plan a deployment with its strategy (outside any transaction: it calls plugins).

    Raises a validation error naming ``strategy`` or ``strategy_config.<field>``, and
    ``UnavailableError`` when the plan shifts traffic and no load balancer serves.
    """
    settings = get_settings()
    strategy = payload.strategy or settings.default_strategy
    strategies = plugin_names(PluginType.STRATEGY, refresh=False)
    if strategy not in strategies:
        raise field_error(
            "strategy", f"unknown strategy {strategy!r}; active: {', '.join(strategies)}"
        )
    if payload.plugin is not None:
        return plugin_commands.plan_plugin(payload, strategy, rollback_of=rollback_of)
    for name in ("tenant_id", "release"):
        if getattr(payload, name) is None:
            raise field_error(
                name, "a release deployment names tenant_id and release (a plugin one: plugin)"
            )
    for name in ("version", "tenants", "plan", "environment"):
        if getattr(payload, name) is not None:
            raise field_error(name, f"{name} is for a plugin deployment: give plugin too")
    assert payload.tenant_id is not None and payload.release is not None
    with session_scope() as session:
        tenant = session.get(Tenant, payload.tenant_id)
        if tenant is None:
            raise NotFoundError(f"tenant {payload.tenant_id!r} does not exist")
        instances = list(
            session.scalars(
                select(Instance.name)
                .where(Instance.tenant_id == tenant.id, Instance.role == "app")
                .order_by(Instance.ordinal)
            )
        )
        platform, current, environment = tenant.platform, tenant.release, tenant.environment
    deployment_id = uuid.uuid4().hex
    spec = DeploymentSpec(
        deployment_id=deployment_id,
        tenant_id=payload.tenant_id,
        version=payload.release.version,
        previous_version=current.get("version"),
        artifact=payload.release.artifact(platform),
        instances=instances,
        config=payload.strategy_config,
        environment=environment,
    )
    stages = get_strategy(strategy).plan(spec).stages
    if any(stage.action in ("set_weight", "route") for stage in stages):
        traffic.require(f"strategy {strategy!r}")
    return Planned(payload, deployment_id, strategy, list(stages), rollback_of)


def create(session: Session, planned: Planned) -> Outcome:
    """Record a planned deployment; start it, or wait for approvals in production."""
    settings = get_settings()
    payload, strategy, rollback_of = planned.payload, planned.strategy, planned.rollback_of
    if payload.plugin is not None:
        return plugin_commands.create_plugin(session, planned)
    assert payload.tenant_id is not None and payload.release is not None
    tenant = session.get(Tenant, payload.tenant_id, with_for_update=True)
    if tenant is None:
        raise NotFoundError(f"tenant {payload.tenant_id!r} does not exist")
    if tenant.status != TenantStatus.ACTIVE:
        raise ConflictError(
            f"tenant {tenant.id!r} is {tenant.status}: only an active tenant deploys"
        )
    if tenant.placement not in (None, settings.default_provisioner, "container_per_tenant"):
        raise ConflictError(
            f"tenant {tenant.id!r} runs on the shared pool {tenant.placement!r}: "
            "only a tenant with its own instances runs its own release"
        )
    open_one = _open_for(session, tenant.id)
    if open_one is not None:
        raise ConflictError(
            f"tenant {tenant.id!r} has deployment {open_one.id} in progress ({open_one.status}); "
            "one deployment at a time"
        )
    deployment_id = planned.deployment_id
    plan_stages = planned.stages
    production = tenant.environment == Environment.PRODUCTION and rollback_of is None
    now = utcnow()
    row = Deployment(
        id=deployment_id,
        tenant_id=tenant.id,
        status=DeploymentStatus.PENDING,
        strategy=strategy,
        strategy_config=dict(payload.strategy_config),
        environment=tenant.environment,
        release=payload.release.model_dump(mode="json"),
        previous_release=dict(tenant.release),
        stages=[stage.model_dump(mode="json") for stage in plan_stages],
        stage_index=0,
        stage_state={},
        measurements=[],
        timeline=[{"at": now.isoformat(), "event": "created", "actor": payload.actor}],
        approvals_required=settings.production_approvals if production else 0,
        approval_expires_at=now + dt.timedelta(seconds=settings.approval_ttl)
        if production
        else None,
        requests={},
        actor=payload.actor,
        rollback_of=rollback_of,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    audit(
        session, row, "created", payload.actor, version=payload.release.version, strategy=strategy
    )
    emit(
        "deployment.created",
        tenant_id=tenant.id,
        subject=row.id,
        data={"deployment_id": row.id, "version": payload.release.version, "strategy": strategy},
    )
    if production and row.approvals_required > 0:
        row.status = DeploymentStatus.AWAITING_APPROVAL
        add_timeline(row, "awaiting_approval", required=row.approvals_required)
        return Outcome(data=summary(row), tenant_id=tenant.id)
    return _start(session, row, tenant)


# -- approvals --------------------------------------------------------------------------------


def _valid_approvals(session: Session, row: Deployment, now: dt.datetime) -> list[str]:
    return list(
        session.scalars(
            select(Approval.actor).where(
                Approval.deployment_id == row.id,
                Approval.decision == "approve",
                Approval.expires_at > now,
            )
        )
    )


def _awaiting(row: Deployment, action: str) -> None:
    if row.status != DeploymentStatus.AWAITING_APPROVAL:
        raise ConflictError(f"cannot {action} deployment {row.id}: it is {row.status}")


def approve(session: Session, payload: DeploymentAction) -> Outcome:
    """Record one approver; once enough distinct ones approve, in time, the deployment starts."""
    row = _get(session, payload.deployment_id)
    _awaiting(row, "approve")
    now = utcnow()
    if row.approval_expires_at is not None and row.approval_expires_at <= now:
        raise ConflictError(
            f"deployment {row.id} waited for approval past {row.approval_expires_at.isoformat()}: "
            "it is refused; create it again"
        )
    ttl = dt.timedelta(seconds=get_settings().approval_ttl)
    existing = session.scalars(
        select(Approval).where(Approval.deployment_id == row.id, Approval.actor == payload.actor)
    ).first()
    if existing is None:
        session.add(
            Approval(
                deployment_id=row.id,
                actor=payload.actor,
                decision="approve",
                comment=payload.reason,
                created_at=now,
                expires_at=now + ttl,
            )
        )
    else:
        existing.decision, existing.created_at, existing.expires_at = "approve", now, now + ttl
    session.flush()
    approvers = _valid_approvals(session, row, now)
    audit(session, row, "approved", payload.actor, approvals=len(approvers))
    add_timeline(
        row,
        "approved",
        actor=payload.actor,
        approvals=len(approvers),
        required=row.approvals_required,
    )
    emit(
        "deployment.approved",
        tenant_id=row.tenant_id,
        subject=row.id,
        data={"deployment_id": row.id, "actor": payload.actor, "approvals": len(approvers)},
    )
    if len(approvers) < row.approvals_required:
        return Outcome(
            data={
                **summary(row),
                "approvals": sorted(approvers),
                "required": row.approvals_required,
            },
            tenant_id=row.tenant_id,
        )
    if row.plugin is not None:
        return plugin_commands.approved_plugin(session, row, approvers)
    tenant = session.get(Tenant, row.tenant_id, with_for_update=True)
    assert tenant is not None
    outcome = _start(session, row, tenant)
    outcome.data["approvals"] = sorted(approvers)
    return outcome


def reject(session: Session, payload: DeploymentAction) -> Outcome:
    """Refuse the deployment: it ends ``rejected``, having changed nothing."""
    row = _get(session, payload.deployment_id)
    _awaiting(row, "reject")
    now = utcnow()
    session.add(
        Approval(
            deployment_id=row.id,
            actor=payload.actor,
            decision="reject",
            comment=payload.reason,
            created_at=now,
            expires_at=now,
        )
    )
    row.status, row.finished_at = DeploymentStatus.REJECTED, now
    row.reason = {"code": "rejected", "message": f"rejected by {payload.actor}: {payload.reason}"}
    audit(session, row, "rejected", payload.actor, reason=payload.reason)
    add_timeline(row, "rejected", actor=payload.actor, reason=payload.reason)
    return Outcome(
        data=summary(row),
        tenant_id=row.tenant_id,
        dispatch=plugin_commands.wake_ended(session, row),
    )


def expire_approvals(session: Session) -> tuple[list[str], list[tuple[str, str, list[str]]]]:
    """Refuse deployments whose approval window passed; audit each expired approval.

    Returns their ids, and the runs to dispatch after commit (a plugin deployment's run waits
    in its approval stage: woken, it ends).
    """
    now = utcnow()
    expired = []
    send: list[tuple[str, str, list[str]]] = []
    for row in session.scalars(
        select(Deployment)
        .where(
            Deployment.status == DeploymentStatus.AWAITING_APPROVAL,
            Deployment.approval_expires_at <= now,
        )
        .with_for_update()
    ):
        approvers = list(
            session.scalars(
                select(Approval.actor).where(
                    Approval.deployment_id == row.id, Approval.decision == "approve"
                )
            )
        )
        for actor in approvers:
            audit(session, row, "approval_expired", actor)
        row.status, row.finished_at = DeploymentStatus.EXPIRED, now
        row.reason = {
            "code": "expired",
            "message": f"not approved by {row.approvals_required} approvers in time "
            f"(had {len(approvers)})",
        }
        audit(session, row, "expired", "cul8er", approvals=approvers)
        add_timeline(row, "expired", approvals=approvers)
        expired.append(row.id)
        send.extend(plugin_commands.wake_ended(session, row))
    return expired, send


# -- requests to a running deployment ---------------------------------------------------------


def _ask(session: Session, row: Deployment, key: str, actor: str, **extra: Any) -> Outcome:
    """Leave a request for the running stage and wake the step now."""
    row.requests = {**row.requests, key: {"actor": actor, "at": utcnow().isoformat(), **extra}}
    audit(session, row, f"{key}_requested", actor, **extra)
    send = ledger.wake(session, row.workflow_id) if row.workflow_id else []
    return Outcome(data={**summary(row), "requested": key}, tenant_id=row.tenant_id, dispatch=send)


def _running(row: Deployment, action: str) -> None:
    if row.status not in (DeploymentStatus.PROGRESSING, DeploymentStatus.PAUSED):
        raise ConflictError(f"cannot {action} deployment {row.id}: it is {row.status}")


def promote(session: Session, payload: PromoteDeployment) -> Outcome:
    """End the current pause or gate now (``full``: skip every stage up to promotion)."""
    row = _get(session, payload.deployment_id)
    _running(row, "promote")
    if payload.full:
        return _ask(session, row, "promote_full", payload.actor)
    return _ask(session, row, "promote", payload.actor)


def pause(session: Session, payload: DeploymentAction) -> Outcome:
    """Hold the deployment after its current stage until someone resumes it."""
    row = _get(session, payload.deployment_id)
    _running(row, "pause")
    return _ask(session, row, "pause", payload.actor, reason=payload.reason)


def resume(session: Session, payload: DeploymentAction) -> Outcome:
    """Go on after a pause, or look again after an inconclusive analysis."""
    row = _get(session, payload.deployment_id)
    _running(row, "resume")
    row.requests = {k: v for k, v in row.requests.items() if k != "pause"}
    return _ask(session, row, "resume", payload.actor)


def abort(session: Session, payload: DeploymentAction) -> Outcome:
    """Stop and roll back; before it started, just refuse it. Nothing in progress: refused."""
    row = _get(session, payload.deployment_id)
    if row.status in (DeploymentStatus.PENDING, DeploymentStatus.AWAITING_APPROVAL):
        row.status, row.finished_at = DeploymentStatus.ABORTED, utcnow()
        row.reason = {"code": "aborted", "message": f"aborted by {payload.actor} before it started"}
        audit(session, row, "aborted", payload.actor, reason=payload.reason)
        add_timeline(row, "aborted", actor=payload.actor)
        return Outcome(
            data=summary(row),
            tenant_id=row.tenant_id,
            dispatch=plugin_commands.wake_ended(session, row),
        )
    if row.status not in (DeploymentStatus.PROGRESSING, DeploymentStatus.PAUSED):
        raise ConflictError(f"deployment {row.id} is {row.status}: there is nothing to abort")
    return _ask(session, row, "abort", payload.actor, reason=payload.reason)


def retry(session: Session, payload: DeploymentAction) -> Outcome:
    """Run an aborted, rolled-back or failed deployment again from its first stage."""
    row = _get(session, payload.deployment_id)
    if row.status not in _RETRYABLE:
        raise ConflictError(
            f"cannot retry deployment {row.id}: it is {row.status} "
            f"(retry works after {', '.join(_RETRYABLE)})"
        )
    if row.plugin is not None:
        open_plugin = plugin_commands.open_for_plugin(session, row.plugin)
        if open_plugin is not None:
            raise ConflictError(
                f"plugin {row.plugin!r} has deployment {open_plugin.id} in progress"
            )
        row.stage_index, row.stage_state, row.requests = 0, {}, {}
        row.finished_at = None
        audit(session, row, "retried", payload.actor)
        add_timeline(row, "retried", actor=payload.actor)
        return plugin_commands.start_plugin(session, row)
    assert row.tenant_id is not None
    open_one = _open_for(session, row.tenant_id)
    if open_one is not None:
        raise ConflictError(f"tenant {row.tenant_id!r} has deployment {open_one.id} in progress")
    tenant = session.get(Tenant, row.tenant_id, with_for_update=True)
    assert tenant is not None
    if tenant.release.get("version") != row.previous_release.get("version"):
        raise ConflictError(
            f"tenant {tenant.id!r} now runs {tenant.release.get('version')!r}, not the release "
            f"this deployment started from: create a new deployment"
        )
    row.stage_index, row.stage_state, row.requests = 0, {}, {}
    row.finished_at = None
    audit(session, row, "retried", payload.actor)
    add_timeline(row, "retried", actor=payload.actor)
    return _start(session, row, tenant)


def plan_rollback(payload: DeploymentAction) -> Planned:
    """Plan the fast way back from a succeeded deployment: its previous release, direct."""
    with session_scope() as session:
        row = session.get(Deployment, payload.deployment_id)
        if row is None:
            raise NotFoundError(f"deployment {payload.deployment_id!r} does not exist")
        tenant_id, previous = row.tenant_id, dict(row.previous_release)
        plugin, targets = row.plugin, [str(t) for t in row.targets]
    if plugin is not None:
        back = CreateDeployment(
            plugin=plugin,
            version=previous.get("version"),
            tenants=targets,
            strategy="direct",
            actor=payload.actor,
        )
        return replace(plan(back, rollback_of=payload.deployment_id), action=payload)
    if not previous:
        raise ConflictError(
            f"deployment {payload.deployment_id} was the tenant's first release: "
            "nothing to go back to"
        )
    request = CreateDeployment(
        tenant_id=tenant_id,
        release=Release.model_validate(previous),
        strategy="direct" if traffic.availability()[0] is not None else "rolling",
        actor=payload.actor,
    )
    planned = plan(request, rollback_of=payload.deployment_id)
    return replace(planned, action=payload)


def rollback(session: Session, planned: Planned) -> Outcome:
    """After a completed promotion: put the previous release back at once (a new, direct
    deployment that needs no approval, recorded as the rollback of this one)."""
    action = planned.action
    assert action is not None
    row = _get(session, action.deployment_id)
    if row.status != DeploymentStatus.SUCCEEDED:
        raise ConflictError(
            f"deployment {row.id} is {row.status}: only a succeeded one is rolled back this "
            "way (abort one in progress)"
        )
    if row.plugin is not None:
        audit(session, row, "rollback_requested", action.actor, reason=action.reason)
        outcome = create(session, planned)
        outcome.data["rollback_of"] = row.id
        return outcome
    tenant = session.get(Tenant, row.tenant_id)
    assert tenant is not None
    if tenant.release.get("version") != row.release.get("version"):
        raise ConflictError(
            f"tenant {tenant.id!r} runs {tenant.release.get('version')!r} now, not this "
            f"deployment's {row.release.get('version')!r}"
        )
    audit(session, row, "rollback_requested", action.actor, reason=action.reason)
    outcome = create(session, planned)
    outcome.data["rollback_of"] = row.id
    return outcome


# -- reading ----------------------------------------------------------------------------------


def describe(session: Session, row: Deployment) -> dict[str, Any]:
    """Everything about a deployment: stages, timeline, measurements, approvals."""
    approvals = session.scalars(
        select(Approval).where(Approval.deployment_id == row.id).order_by(Approval.created_at)
    ).all()
    now = utcnow()
    return {
        **summary(row),
        "release": row.release,
        "previous_release": row.previous_release,
        "strategy_config": row.strategy_config,
        "stages": row.stages,
        "stage": row.stages[row.stage_index]["name"] if row.stage_index < len(row.stages) else None,
        "stage_state": {k: v for k, v in row.stage_state.items() if k != "before"},
        "measurements": row.measurements,
        "timeline": row.timeline,
        "approvals_required": row.approvals_required,
        "approval_expires_at": row.approval_expires_at.isoformat()
        if row.approval_expires_at
        else None,
        "approvals": [
            {
                "actor": a.actor,
                "decision": a.decision,
                "comment": a.comment,
                "at": a.created_at.isoformat(),
                "expired": a.decision == "approve" and a.expires_at <= now,
            }
            for a in approvals
        ],
        "requests": row.requests,
        "moved": plugin_commands.moved(session, row),
        "reason": row.reason,
        "actor": row.actor,
        "rollback_of": row.rollback_of,
        "created_at": row.created_at.isoformat(),
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
    }


def list_deployments(session: Session, payload: ListDeployments) -> list[dict[str, Any]]:
    """Deployments, newest first, optionally of one tenant or in one status."""
    query = select(Deployment).order_by(Deployment.created_at.desc()).limit(payload.limit)
    if payload.tenant_id:
        query = query.where(Deployment.tenant_id == payload.tenant_id)
    if payload.plugin:
        query = query.where(Deployment.plugin == payload.plugin)
    if payload.status:
        query = query.where(Deployment.status == payload.status)
    return [summary(row) for row in session.scalars(query)]


def count_open(session: Session) -> int:
    """Deployments in progress (for metrics and the CLI)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Deployment)
            .where(Deployment.status.in_(DEPLOYMENT_OPEN))
        )
        or 0
    )
