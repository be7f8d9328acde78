"""What is asked of plugin deployments: plan, create, start, approve, and what they moved.

See docs/architecture.md §10. ``commands.py`` hands a request here when it names a plugin;
each function runs inside the public task's transaction, as the release commands do.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from sqlalchemy import select

from schemas.plugins import DeploymentSpec, Stage
from schemas.states import DEPLOYMENT_OPEN, DeploymentStatus, Environment, Phase, TenantStatus
from workers.delivery.cohorts import Cohort, hash_order
from workers.delivery.rows import WORKFLOW, Planned, add_timeline, audit, field_error, summary
from workers.engine import ledger
from workers.engine.events import emit
from workers.engine.public import Outcome
from workers.pluginhost.calls import registry
from workers.pluginhost.handles import get_strategy
from workers.runtime.db import session_scope
from workers.runtime.errors import ConflictError
from workers.runtime.models import Deployment, Plugin, Tenant, utcnow
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from schemas.tasks import CreateDeployment

__all__ = [
    "approved_plugin",
    "create_plugin",
    "moved",
    "open_for_plugin",
    "plan_plugin",
    "start_plugin",
    "wake_ended",
]


def plan_plugin(
    payload: CreateDeployment, strategy: str, *, rollback_of: str | None = None
) -> Planned:
    """Plan moving the tenants ``payload`` picks to a plugin version (see ``cohorts.py``)."""
    for name in ("tenant_id", "release"):
        if getattr(payload, name) is not None:
            raise field_error(
                name,
                f"a plugin deployment moves tenants: pick them with tenants, plan or "
                f"environment, not {name}",
            )
    if payload.version is None:
        raise field_error("version", "a plugin deployment names the version tenants move to")
    plugin, version = str(payload.plugin), payload.version
    reg = registry()
    served = reg.served.get(plugin)
    if served is None or served.state != "active":
        active = ", ".join(sorted(n for n, s in reg.served.items() if s.state == "active"))
        raise field_error("plugin", f"plugin {plugin!r} is not active; active: {active}")
    installed = reg.installed_versions(plugin)
    if version not in installed:
        raise field_error(
            "version",
            f"{plugin} {version} is not installed; installed: {', '.join(installed)} "
            f"(cul8er plugin install, or plugin update)",
        )
    targets, environment = _pick_tenants(payload)
    deployment_id = uuid.uuid4().hex
    spec = DeploymentSpec(
        deployment_id=deployment_id,
        tenant_id="",
        plugin=plugin,
        version=version,
        previous_version=served.loaded.version,
        instances=targets,
        config=payload.strategy_config,
        environment=environment,
    )
    # The way back to a version that served (a rollback) needs neither check nor approval.
    head = [] if rollback_of else [Stage(name="sandbox", action="sandbox")]
    if (
        environment == Environment.PRODUCTION
        and get_settings().production_approvals > 0
        and rollback_of is None
    ):
        head.append(Stage(name="approval", action="approval"))
    stages = [*head, *get_strategy(strategy).plan(spec).stages]
    return Planned(
        payload,
        deployment_id,
        strategy,
        stages,
        rollback_of=rollback_of,
        targets=tuple(targets),
        previous_version=served.loaded.version,
        environment=environment,
    )


def _pick_tenants(payload: CreateDeployment) -> tuple[list[str], str]:
    """The tenants a plugin deployment moves, in hash order, and its environment (the most
    guarded one among them: production if any is)."""
    query = select(Tenant.id, Tenant.environment).where(
        Tenant.status.in_((TenantStatus.ACTIVE, TenantStatus.SUSPENDED))
    )
    if payload.tenants is not None:
        query = query.where(Tenant.id.in_(payload.tenants))
    if payload.plan is not None:
        query = query.where(Tenant.plan == payload.plan)
    if payload.environment is not None:
        query = query.where(Tenant.environment == payload.environment)
    with session_scope() as session:
        found = dict(session.execute(query).tuples().all())
    if payload.tenants is not None:
        missing = sorted(set(payload.tenants) - set(found))
        if missing:
            raise field_error(
                "tenants",
                f"not active (or not matching plan/environment): {', '.join(missing[:10])}",
            )
    if not found:
        raise field_error("tenants", "no active tenant matches tenants, plan and environment")
    order = list(Environment)  # from the least guarded to the most
    environment = max(found.values(), key=lambda e: order.index(Environment(e)))
    return hash_order(str(payload.plugin), list(found)), str(environment)


def open_for_plugin(session: Session, plugin: str) -> Deployment | None:
    return session.scalars(
        select(Deployment)
        .where(Deployment.plugin == plugin, Deployment.status.in_(DEPLOYMENT_OPEN))
        .order_by(Deployment.created_at)
        .limit(1)
    ).first()


def create_plugin(session: Session, planned: Planned) -> Outcome:
    """Record a plugin deployment and start it: its sandbox stage runs before any approval."""
    settings = get_settings()
    payload = planned.payload
    plugin = str(payload.plugin)
    # The plugin's row, locked: two creates for one plugin take turns.
    if session.get(Plugin, plugin, with_for_update=True) is None:
        raise field_error("plugin", f"plugin {plugin!r} has no row: run cul8er db upgrade")
    open_one = open_for_plugin(session, plugin)
    if open_one is not None:
        raise ConflictError(
            f"plugin {plugin!r} has deployment {open_one.id} in progress ({open_one.status}); "
            "one deployment at a time"
        )
    production = any(stage.action == "approval" for stage in planned.stages)
    now = utcnow()
    row = Deployment(
        id=planned.deployment_id,
        tenant_id=None,
        plugin=plugin,
        targets=list(planned.targets),
        status=DeploymentStatus.PENDING,
        strategy=planned.strategy,
        strategy_config=dict(payload.strategy_config),
        environment=planned.environment or Environment.DEVELOPMENT,
        release={"version": payload.version},
        previous_release={"version": planned.previous_version},
        stages=[stage.model_dump(mode="json") for stage in planned.stages],
        stage_index=0,
        stage_state={},
        measurements=[],
        timeline=[{"at": now.isoformat(), "event": "created", "actor": payload.actor}],
        approvals_required=settings.production_approvals if production else 0,
        requests={},
        actor=payload.actor,
        rollback_of=planned.rollback_of,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    audit(
        session,
        row,
        "created",
        payload.actor,
        plugin=plugin,
        version=payload.version,
        strategy=planned.strategy,
        tenants=len(planned.targets),
    )
    emit(
        "deployment.created",
        subject=row.id,
        data={"deployment_id": row.id, "plugin": plugin, "version": payload.version},
    )
    return start_plugin(session, row)


def start_plugin(session: Session, row: Deployment) -> Outcome:
    """A fresh ledger run for the plugin deployment (it owns no tenant: tenants keep working)."""
    run = ledger.new_run(
        session,
        kind=WORKFLOW,
        tenant_id=None,
        input={"deployment_id": row.id},
        grace=get_settings().reconcile_grace,
    )
    row.workflow_id = run.id
    row.status = DeploymentStatus.PROGRESSING
    row.reason = None
    add_timeline(row, "started", workflow_id=run.id)
    emit(
        "deployment.started",
        workflow_id=run.id,
        subject=row.id,
        data={"deployment_id": row.id, "plugin": row.plugin, "version": row.release["version"]},
    )
    return Outcome(
        data=summary(row),
        dispatch=[(run.id, Phase.FORWARD, ledger.pending_tasks(session, run.id, Phase.FORWARD))],
    )


def approved_plugin(session: Session, row: Deployment, approvers: list[str]) -> Outcome:
    """Enough approvers: the parked approval stage goes on now."""
    row.status = DeploymentStatus.PROGRESSING
    row.stage_state = {"approved": True, "approvers": sorted(approvers)}
    add_timeline(row, "approval_complete", approvers=sorted(approvers))
    send = ledger.wake(session, row.workflow_id) if row.workflow_id else []
    return Outcome(data={**summary(row), "approvals": sorted(approvers)}, dispatch=send)


def wake_ended(session: Session, row: Deployment) -> list[tuple[str, str, list[str]]]:
    """A plugin deployment refused while its run waits: wake the run so it ends now."""
    if row.plugin is None or row.workflow_id is None:
        return []
    return ledger.wake(session, row.workflow_id)


def moved(session: Session, row: Deployment) -> list[str] | None:
    """A plugin deployment's tenants on its version now, in move order (``None``: a release)."""
    if row.plugin is None:
        return None
    cohort = Cohort(
        deployment_id=row.id,
        plugin=row.plugin,
        version=str(row.release["version"]),
        targets=[str(t) for t in row.targets],
    )
    return cohort.moved(session)
