"""``cul8er.autoscale.evaluate``: every active tenant's rules, one decision row per slot.

Each (tenant, rule, slot) is decided once: the decision row's unique key is inserted in
the same transaction that starts the action's workflow, so a second beat, a re-run or a
concurrent delivery of the same slot finds the row (or loses the insert) and does nothing.
The slot's key in ``operations`` is written after the run, so a run killed halfway is
finished by its redelivery, and a finished one is not repeated.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from schemas.states import Phase, TenantStatus
from tasks import workflows as wf
from workers.economics.autoscale import (
    NO_ACTION,
    SOURCE_METRICS,
    Decision,
    TenantState,
    UsageWindow,
    decide,
    lookback,
    resolve_rules,
)
from workers.economics.plans import load_catalog
from workers.engine import ledger
from workers.engine.events import emit
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.models import (
    AuditEvent,
    AutoscaleDecision,
    Instance,
    Operation,
    Tenant,
    UsageRecord,
    utcnow,
)
from workers.runtime.schedule import claim_slot, slot_start
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from schemas.autoscale import AutoscaleRule
    from schemas.plans import Plan

__all__ = ["EVALUATE", "Evaluation", "evaluate", "evaluate_slot", "start_tenant_workflow"]

log = structlog.get_logger(__name__)

#: The task's name, also the prefix of its slot keys in ``operations``.
EVALUATE = "cul8er.autoscale.evaluate"


@dataclass
class Evaluation:
    """What one slot's run did, and the workflows to dispatch after its commits."""

    slot: dt.datetime
    skipped: bool = False
    decisions: int = 0
    actions: int = 0
    dispatch: list[tuple[str, str, list[str]]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The run as JSON."""
        return {
            "slot": self.slot.isoformat(),
            "skipped": self.skipped,
            "decisions": self.decisions,
            "actions": self.actions,
        }


def start_tenant_workflow(
    session: Session, tenant: Tenant, kind: str, input: dict[str, Any]
) -> str | None:
    """Start ``kind`` owning ``tenant`` if it is active and free; its run id, else ``None``.

    The guarded UPDATE takes the tenant only if no run owns it, even when another
    transaction (a public ``change_plan``) read it at the same moment. The caller
    dispatches the run's forward steps after commit.
    """
    run_id = ledger.new_run_id()
    taken = session.execute(
        update(Tenant)
        .where(
            Tenant.id == tenant.id,
            Tenant.status == TenantStatus.ACTIVE,
            Tenant.active_workflow_id.is_(None),
        )
        .values(active_workflow_id=run_id)
        .execution_options(synchronize_session="fetch")
    )
    if getattr(taken, "rowcount", 0) != 1:
        return None
    ledger.new_run(
        session,
        kind=kind,
        tenant_id=tenant.id,
        input=input,
        grace=get_settings().reconcile_grace,
        run_id=run_id,
    )
    session.add(AuditEvent(tenant_id=tenant.id, kind=f"{kind}.requested", data={**input}))
    return run_id


def _state(session: Session, tenant: Tenant, plan: Plan) -> TenantState:
    instances = session.scalar(
        select(func.count()).select_from(Instance).where(Instance.tenant_id == tenant.id)
    )
    last = session.scalars(
        select(AutoscaleDecision)
        .where(
            AutoscaleDecision.tenant_id == tenant.id,
            AutoscaleDecision.action != NO_ACTION,
            AutoscaleDecision.workflow_id.is_not(None),
        )
        .order_by(AutoscaleDecision.decided_at.desc())
        .limit(1)
    ).first()
    return TenantState(
        tenant_id=tenant.id,
        plan=plan,
        instances=int(instances or 0),
        busy_with=tenant.active_workflow_id,
        last_action_at=last.decided_at if last is not None else None,
        last_action_rule=last.rule if last is not None else None,
    )


def _windows(
    session: Session, tenant_id: str, rule: AutoscaleRule, now: dt.datetime, seconds: float
) -> list[UsageWindow]:
    rows = session.execute(
        select(UsageRecord.window_start, UsageRecord.window_end, UsageRecord.value).where(
            UsageRecord.tenant_id == tenant_id,
            UsageRecord.metric == SOURCE_METRICS[rule.metric],
            UsageRecord.window_end > now - dt.timedelta(seconds=seconds),
            UsageRecord.window_start < now,
        )
    ).all()
    return [UsageWindow(start=s, end=e, value=float(v)) for s, e, v in rows]


def _act(
    session: Session,
    tenant: Tenant,
    rule: AutoscaleRule,
    decision: Decision,
    plans: dict[str, Plan],
) -> str | None:
    """Start the decision's workflow; its run id, or ``None`` when the tenant was taken."""
    reason = f"autoscale {rule.name}: {decision.reason}"
    resources = dict(tenant.resources)
    if decision.instances is not None:
        previous = decision.inputs["instances"]
        # The tenant's instance count lives with its resources, so a later plan change
        # (whose apply_limits scales to it) keeps what autoscale decided.
        resources["instances"] = decision.instances
        input_: dict[str, Any] = {
            "plan": tenant.plan,
            "previous_plan": tenant.plan,
            "instances": decision.instances,
            "previous_instances": previous,
            "reason": reason,
        }
    else:
        target = decision.target_plan or tenant.plan
        plan = plans[target]
        stored = resources.get("instances")
        if isinstance(stored, int) and plan.max_instances is not None:
            resources["instances"] = min(stored, plan.max_instances)
        input_ = {"plan": target, "previous_plan": tenant.plan, "reason": reason}
    run_id = start_tenant_workflow(session, tenant, wf.CHANGE_PLAN.kind, input_)
    if run_id is not None:
        tenant.resources = resources
    return run_id


def _decide_one(
    tenant_id: str,
    rule: AutoscaleRule,
    slot: dt.datetime,
    now: dt.datetime,
    plans: dict[str, Plan],
    result: Evaluation,
) -> None:
    """Decide one rule of one tenant for ``slot`` (nothing if it was decided already)."""
    try:
        with session_scope() as session:
            decided = _decide_in(session, tenant_id, rule, slot, now, plans)
    except IntegrityError:
        log.info("autoscale_decided_concurrently", tenant_id=tenant_id, rule=rule.name)
        return
    if decided is None:
        return
    decision, event = decided
    result.decisions += 1
    log.info("autoscale_decided", tenant_id=tenant_id, rule=rule.name, reason=decision.reason)
    if event is not None:
        _announce(tenant_id, rule, event, result)


def _decide_in(
    session: Session,
    tenant_id: str,
    rule: AutoscaleRule,
    slot: dt.datetime,
    now: dt.datetime,
    plans: dict[str, Plan],
) -> tuple[Decision, dict[str, Any] | None] | None:
    """Decide and record the rule in ``session``: the decision and its action's event data
    (``None`` for no action), or ``None`` when the slot was decided or the tenant is gone."""
    decided = session.scalars(
        select(AutoscaleDecision.id).where(
            AutoscaleDecision.tenant_id == tenant_id,
            AutoscaleDecision.rule == rule.name,
            AutoscaleDecision.window_start == slot,
        )
    ).first()
    tenant = session.get(Tenant, tenant_id)
    if decided is not None or tenant is None or tenant.status != TenantStatus.ACTIVE:
        return None
    decision = _decision(session, tenant, rule, now, plans)
    row = AutoscaleDecision(
        tenant_id=tenant_id,
        rule=rule.name,
        window_start=slot,
        action=decision.action,
        reason=decision.reason,
        inputs=decision.inputs,
        decided_at=now,
    )
    session.add(row)
    session.flush()  # the unique key: a concurrent evaluation of this slot stops here
    if decision.action == NO_ACTION:
        return decision, None
    return decision, _start_action(session, tenant, rule, decision, row, plans, slot)


def _decision(
    session: Session, tenant: Tenant, rule: AutoscaleRule, now: dt.datetime, plans: dict[str, Plan]
) -> Decision:
    """What ``rule`` decides for ``tenant`` now, over its usage rows and its state."""
    plan = plans.get(tenant.plan)
    if plan is None:
        return Decision(NO_ACTION, f"no action: plan {tenant.plan!r} is not in the catalog", {})
    settings = get_settings()
    stabilization = settings.autoscale_stabilization
    if rule.stabilization is not None:
        stabilization = rule.stabilization
    return decide(
        rule,
        _state(session, tenant, plan),
        _windows(session, tenant.id, rule, now, lookback(rule, stabilization)),
        now=now,
        plans=plans,
        default_cooldown=settings.autoscale_cooldown,
        default_stabilization=settings.autoscale_stabilization,
    )


def _start_action(
    session: Session,
    tenant: Tenant,
    rule: AutoscaleRule,
    decision: Decision,
    row: AutoscaleDecision,
    plans: dict[str, Plan],
    slot: dt.datetime,
) -> dict[str, Any] | None:
    """Start the decision's workflow and note it on ``row``; the event data, or ``None``
    (the row then says no action) when another workflow took the tenant first."""
    run_id = _act(session, tenant, rule, decision, plans)
    if run_id is None:
        row.action = NO_ACTION
        row.reason = "no action: tenant taken by another workflow"
        return None
    row.workflow_id = run_id
    session.add(
        AuditEvent(
            tenant_id=tenant.id,
            kind="autoscale.decided",
            data={"rule": rule.name, "action": row.action, "reason": row.reason},
        )
    )
    return {
        "workflow_id": run_id,
        "rule": rule.name,
        "action": row.action,
        "reason": row.reason,
        "inputs": row.inputs,
        "slot": slot.isoformat(),
    }


def _announce(
    tenant_id: str, rule: AutoscaleRule, event: dict[str, Any], result: Evaluation
) -> None:
    """Queue the started workflow's dispatch (after commit) and emit ``autoscale.decided``."""
    result.actions += 1
    result.dispatch.append((event["workflow_id"], Phase.FORWARD, wf.CHANGE_PLAN.forward_tasks))
    emit(
        "autoscale.decided",
        tenant_id=tenant_id,
        workflow_id=event["workflow_id"],
        subject=rule.name,
        data=event,
    )


def evaluate_slot(slot: dt.datetime, *, now: dt.datetime | None = None) -> Evaluation:
    """Decide every active tenant's rules for ``slot``; the caller dispatches the actions."""
    now = now or utcnow()
    result = Evaluation(slot=slot)
    key = f"{EVALUATE}:{slot.isoformat()}"
    with session_scope() as session:
        if session.get(Operation, key) is not None:
            result.skipped = True
            return result
        tenants = session.execute(
            select(Tenant.id, Tenant.plan, Tenant.meta)
            .where(Tenant.status == TenantStatus.ACTIVE)
            .order_by(Tenant.id)
        ).all()
    plans = dict(load_catalog(get_settings().plans_file).plans)
    for tenant_id, plan_name, meta in tenants:
        plan = plans.get(plan_name)
        if plan is None:
            log.warning("autoscale_unknown_plan", tenant_id=tenant_id, plan=plan_name)
            continue
        rules, problems = resolve_rules(plan, meta or {})
        for problem in problems:
            log.warning("autoscale_rules_invalid", tenant_id=tenant_id, problem=problem)
        for rule in rules:
            _decide_one(tenant_id, rule, slot, now, plans, result)
    claim_slot(EVALUATE, slot, result=result.summary())
    return result


@app.task(name=EVALUATE, ignore_result=True)
def evaluate() -> dict[str, Any]:
    """Evaluate every active tenant's autoscale rules for the current slot."""
    slot = slot_start(get_settings().autoscale_interval)
    result = evaluate_slot(slot)
    for run_id, phase, tasks in result.dispatch:
        # After commit: a lost send is found by reconcile once the run's deadline passes.
        ledger.dispatch(app, run_id, phase, tasks)
    if result.actions:
        log.info("autoscale_actions_started", **result.summary())
    return result.summary()
