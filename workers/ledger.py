"""The workflow ledger: runs and steps in the database, advanced by Celery chains.

Each step is a Celery task that first *claims* its row, does its work, then
*completes* it. A row that is already done makes a repeated delivery a no-op;
a live lease makes a concurrent delivery step aside. The database is the truth:
``tick`` dispatches due waits and ``reconcile`` resumes runs that stalled.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog
from celery import chain
from sqlalchemy import select, update

from workers.models import StepRun, WorkflowRun, utcnow
from workers.workflow import COMPENSATE, FORWARD, StepContext, get_workflow

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session

__all__ = [
    "Claim",
    "claim_step",
    "complete_step",
    "dispatch",
    "due_waits",
    "fail_step",
    "new_run",
    "next_pending",
    "stalled_runs",
    "wait_step",
]

log = structlog.get_logger(__name__)

#: Step states after which a row never changes again.
FINISHED = ("done", "failed")
#: The run status that each phase runs under.
PHASE_STATUS = {FORWARD: "running", COMPENSATE: "compensating"}


def new_run_id() -> str:
    """A fresh run id (32 hex characters)."""
    return uuid.uuid4().hex


def new_run(
    session: Session,
    *,
    kind: str,
    tenant_id: str | None,
    input: dict[str, Any],
    grace: float,
    run_id: str | None = None,
) -> WorkflowRun:
    """Insert a run and its pending forward steps; the caller dispatches after commit."""
    workflow = get_workflow(kind)
    now = utcnow()
    run = WorkflowRun(
        id=run_id or new_run_id(),
        kind=kind,
        tenant_id=tenant_id,
        status="running",
        phase=FORWARD,
        current_step=workflow.forward_tasks[0],
        input=input,
        deadline_at=now + dt.timedelta(seconds=grace),
        created_at=now,
        updated_at=now,
    )
    session.add(run)
    session.add_all(
        StepRun(run_id=run.id, phase=FORWARD, position=i, name=name, status="pending")
        for i, name in enumerate(workflow.forward_tasks)
    )
    return run


def dispatch(app: Celery, run_id: str, phase: str, tasks: list[str]) -> None:
    """Send the remaining ``tasks`` of a phase as one chain of immutable signatures."""
    if not tasks:
        return
    kwargs = {"run_id": run_id, "phase": phase}
    signatures = [app.signature(name, kwargs=kwargs, immutable=True) for name in tasks]
    chain(*signatures).apply_async()
    log.debug("workflow_dispatched", workflow_id=run_id, phase=phase, first=tasks[0])


@dataclass(frozen=True)
class Claim:
    """What a delivery of a step found: run it, its stored output, or nothing to do."""

    outcome: Literal["claimed", "done", "busy", "inactive"]
    context: StepContext | None = None
    output: dict[str, Any] | None = None
    #: For ``done``: whether the step after it is still untouched (continue the chain).
    successor_pending: bool = False


def claim_step(
    session: Session, *, run_id: str, phase: str, name: str, task_id: str | None, lease: float
) -> Claim:
    """Take the step for this delivery, unless it is done, leased or its run moved on."""
    run = session.get(WorkflowRun, run_id)
    if run is None or run.status != PHASE_STATUS.get(phase) or run.phase != phase:
        return Claim("inactive")
    now = utcnow()
    lease_until = now + dt.timedelta(seconds=lease)
    claimed = session.execute(
        update(StepRun)
        .where(
            StepRun.run_id == run_id,
            StepRun.phase == phase,
            StepRun.name == name,
            StepRun.status.not_in(FINISHED),
            # A live lease belongs to another delivery that is running the step now.
            ~((StepRun.status == "running") & (StepRun.lease_until > now)),
            ~((StepRun.status == "waiting") & (StepRun.due_at > now)),
        )
        .values(
            status="running",
            attempts=StepRun.attempts + 1,
            lease_until=lease_until,
            task_id=task_id,
            started_at=now,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    rows = session.scalars(
        select(StepRun).where(StepRun.run_id == run_id).order_by(StepRun.phase, StepRun.position)
    ).all()
    phase_rows = [row for row in rows if row.phase == phase]
    mine = next((row for row in phase_rows if row.name == name), None)
    if mine is None:
        return Claim("inactive")
    if not claimed:
        if mine.status in FINISHED:
            later = [row for row in phase_rows if row.position > mine.position]
            pending = bool(later) and later[0].status == "pending"
            return Claim("done", output=mine.output or {}, successor_pending=pending)
        return Claim("busy")
    run.current_step = name
    run.deadline_at = lease_until
    outputs = {r.name: r.output or {} for r in rows if r.phase == FORWARD and r.status == "done"}
    context = StepContext(
        run_id=run_id,
        kind=run.kind,
        phase=phase,
        step=name,
        tenant_id=run.tenant_id,
        input=run.input,
        outputs=outputs,
        attempt=mine.attempts,
        error=run.error,
    )
    return Claim("claimed", context=context)


def complete_step(
    session: Session, *, run_id: str, phase: str, name: str, output: dict[str, Any], grace: float
) -> bool:
    """Record the step's output and move the run on; False if another delivery beat us."""
    now = utcnow()
    done = session.execute(
        update(StepRun)
        .where(
            StepRun.run_id == run_id,
            StepRun.phase == phase,
            StepRun.name == name,
            StepRun.status == "running",
        )
        .values(status="done", output=output, finished_at=now, lease_until=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not done:
        return False
    _advance(session, run_id=run_id, phase=phase, name=name, now=now, grace=grace)
    return True


def _advance(
    session: Session, *, run_id: str, phase: str, name: str, now: dt.datetime, grace: float
) -> None:
    """Point the run at its next step, or finish it after the phase's last step."""
    run = session.get(WorkflowRun, run_id)
    assert run is not None
    following = session.scalars(
        select(StepRun.name)
        .where(StepRun.run_id == run_id, StepRun.phase == phase, StepRun.status.not_in(FINISHED))
        .order_by(StepRun.position)
        .limit(1)
    ).first()
    if following is not None:
        run.current_step = following
        run.deadline_at = now + dt.timedelta(seconds=grace)
        return
    run.status = "succeeded" if phase == FORWARD else "failed"
    run.current_step = None
    run.deadline_at = None
    run.finished_at = now
    log.info("workflow_finished", workflow_id=run_id, kind=run.kind, status=run.status)


def fail_step(
    session: Session,
    *,
    run_id: str,
    phase: str,
    name: str,
    error: dict[str, Any],
    grace: float,
) -> list[str]:
    """Record a failed step; returns the compensation tasks to dispatch (forward phase).

    In the compensation phase a failure is recorded on the run and the remaining
    compensations carry on, so as much as possible is cleaned up.
    """
    now = utcnow()
    failed = session.execute(
        update(StepRun)
        .where(
            StepRun.run_id == run_id,
            StepRun.phase == phase,
            StepRun.name == name,
            StepRun.status == "running",
        )
        .values(status="failed", error=error, finished_at=now, lease_until=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    run = session.get(WorkflowRun, run_id)
    if not failed or run is None:
        return []
    if phase == COMPENSATE:
        errors = [*(run.error or {}).get("compensation_errors", []), {"step": name, **error}]
        run.error = {**(run.error or {}), "compensation_errors": errors}
        _advance(session, run_id=run_id, phase=phase, name=name, now=now, grace=grace)
        return []
    done = session.scalars(
        select(StepRun.name).where(
            StepRun.run_id == run_id, StepRun.phase == FORWARD, StepRun.status == "done"
        )
    ).all()
    tasks = get_workflow(run.kind).compensations_for(list(done))
    run.error = {"step": name, **error}
    log.warning("workflow_compensating", workflow_id=run_id, step=name, error=error)
    if not tasks:
        run.status, run.finished_at, run.current_step, run.deadline_at = "failed", now, None, None
        return []
    session.add_all(
        StepRun(run_id=run_id, phase=COMPENSATE, position=i, name=task, status="pending")
        for i, task in enumerate(tasks)
    )
    run.status, run.phase, run.current_step = "compensating", COMPENSATE, tasks[0]
    run.deadline_at = now + dt.timedelta(seconds=grace)
    return tasks


def wait_step(
    session: Session,
    *,
    run_id: str,
    phase: str,
    name: str,
    delay: float,
    error: dict[str, Any] | None,
    in_ledger: bool,
) -> None:
    """Park the step until ``delay`` has passed.

    ``in_ledger``: the tick dispatches it when due (long waits never sit in the
    broker); otherwise a short broker countdown is under way and the lease covers it.
    """
    now = utcnow()
    due = now + dt.timedelta(seconds=delay)
    values: dict[str, Any] = {"error": error, "lease_until": None}
    if in_ledger:
        values.update(status="waiting", due_at=due)
    else:
        values.update(status="retrying", due_at=due, lease_until=due + dt.timedelta(seconds=30))
    session.execute(
        update(StepRun)
        .where(StepRun.run_id == run_id, StepRun.phase == phase, StepRun.name == name)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(WorkflowRun)
        .where(WorkflowRun.id == run_id)
        .values(deadline_at=due + dt.timedelta(seconds=30), updated_at=now)
    )


def next_pending(session: Session, run: WorkflowRun) -> list[str]:
    """The unfinished steps of the run's current phase, in order."""
    return list(
        session.scalars(
            select(StepRun.name)
            .where(
                StepRun.run_id == run.id,
                StepRun.phase == run.phase,
                StepRun.status.not_in(FINISHED),
            )
            .order_by(StepRun.position)
        ).all()
    )


def due_waits(session: Session, *, limit: int = 500) -> list[tuple[str, str, list[str]]]:
    """Take the waits that are due: ``(run_id, phase, tasks from the step on)`` each.

    Each row is flipped to ``pending`` with a guarded update, so two ticks never
    dispatch the same wait twice.
    """
    now = utcnow()
    rows = session.execute(
        select(StepRun.id, StepRun.run_id, StepRun.phase)
        .join(WorkflowRun, WorkflowRun.id == StepRun.run_id)
        .where(StepRun.status == "waiting", StepRun.due_at <= now)
        .where(WorkflowRun.status.in_(PHASE_STATUS.values()))
        .limit(limit)
    ).all()
    taken: list[tuple[str, str, list[str]]] = []
    for step_id, run_id, phase in rows:
        flipped = session.execute(
            update(StepRun)
            .where(StepRun.id == step_id, StepRun.status == "waiting")
            .values(status="pending", due_at=None)
            .execution_options(synchronize_session=False)
        ).rowcount
        run = session.get(WorkflowRun, run_id)
        if flipped and run is not None:
            taken.append((run_id, phase, next_pending(session, run)))
    return taken


def stalled_runs(
    session: Session, *, grace: float, limit: int = 200
) -> list[tuple[str, str, list[str]]]:
    """Take runs whose deadline passed with no progress: ``(run_id, phase, tasks)`` each.

    A step still under a live lease or a future wait is left alone; the others
    get their deadline pushed out (guarded, so two beats take a run once) and
    are returned for re-dispatch from their first unfinished step.
    """
    now = utcnow()
    runs = session.scalars(
        select(WorkflowRun)
        .where(WorkflowRun.status.in_(PHASE_STATUS.values()), WorkflowRun.deadline_at < now)
        .order_by(WorkflowRun.deadline_at)
        .limit(limit)
    ).all()
    taken: list[tuple[str, str, list[str]]] = []
    for run in runs:
        current = session.scalars(
            select(StepRun)
            .where(
                StepRun.run_id == run.id,
                StepRun.phase == run.phase,
                StepRun.status.not_in(FINISHED),
            )
            .order_by(StepRun.position)
            .limit(1)
        ).first()
        if current is None:
            continue
        busy_until = None
        if current.status in ("running", "retrying") and current.lease_until and current.lease_until > now:
            busy_until = current.lease_until
        elif current.status == "waiting" and current.due_at and current.due_at > now:
            busy_until = current.due_at
        new_deadline = (busy_until or now) + dt.timedelta(seconds=grace)
        moved = session.execute(
            update(WorkflowRun)
            .where(WorkflowRun.id == run.id, WorkflowRun.deadline_at == run.deadline_at)
            .values(deadline_at=new_deadline)
            .execution_options(synchronize_session=False)
        ).rowcount
        if moved and busy_until is None:
            if current.status == "waiting":
                current.status, current.due_at = "pending", None
            log.warning("workflow_stalled", workflow_id=run.id, step=current.name)
            taken.append((run.id, run.phase, next_pending(session, run)))
    return taken
