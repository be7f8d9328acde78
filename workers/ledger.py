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
from typing import TYPE_CHECKING, Any, Literal, cast

import structlog
from celery import chain
from sqlalchemy import case, select, update

from workers.models import StepRun, WorkflowRun, utcnow
from workers.workflow import COMPENSATE, FORWARD, StepContext, get_workflow

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy import CursorResult, Update
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
#: Run states after which a run never changes again.
FINAL_RUN = ("succeeded", "failed")
#: The run status that each phase runs under.
PHASE_STATUS = {FORWARD: "running", COMPENSATE: "compensating"}


def _rowcount(session: Session, statement: Update) -> int:
    """Execute a guarded UPDATE; the rows it changed tell who won."""
    result = cast("CursorResult[Any]", session.execute(statement))
    return int(result.rowcount)


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
    session.flush()  # the run row first: step rows reference it
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
    """Take the step for this delivery, unless it is done, leased or its run moved on.

    Two round trips: a guarded UPDATE that only one delivery can win, then one
    read of the run and its steps. This is the ledger's hot path.
    """
    now = utcnow()
    run_in_phase = (
        select(WorkflowRun.id)
        .where(
            WorkflowRun.id == run_id,
            WorkflowRun.status == PHASE_STATUS.get(phase, "?"),
            WorkflowRun.phase == phase,
        )
        .exists()
    )
    claimed = _rowcount(
        session,
        update(StepRun)
        .where(
            StepRun.run_id == run_id,
            StepRun.phase == phase,
            StepRun.name == name,
            StepRun.status.not_in(FINISHED),
            # A live lease belongs to another delivery that is running the step now.
            ~((StepRun.status == "running") & (StepRun.lease_until > now)),
            ~((StepRun.status == "waiting") & (StepRun.due_at > now)),
            run_in_phase,
        )
        .values(
            status="running",
            attempts=StepRun.attempts + 1,
            lease_until=now + dt.timedelta(seconds=lease),
            task_id=task_id,
            started_at=now,
        )
        .execution_options(synchronize_session=False),
    )
    rows = session.execute(
        select(
            StepRun.phase,
            StepRun.position,
            StepRun.name,
            StepRun.status,
            StepRun.output,
            StepRun.attempts,
            WorkflowRun.kind,
            WorkflowRun.tenant_id,
            WorkflowRun.input,
            WorkflowRun.error,
            WorkflowRun.status.label("run_status"),
            WorkflowRun.phase.label("run_phase"),
        )
        .join(WorkflowRun, WorkflowRun.id == StepRun.run_id)
        .where(StepRun.run_id == run_id)
        .order_by(StepRun.phase, StepRun.position)
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
        if mine.run_status != PHASE_STATUS.get(phase) or mine.run_phase != phase:
            return Claim("inactive")
        return Claim("busy")
    outputs = {r.name: r.output or {} for r in rows if r.phase == FORWARD and r.status == "done"}
    context = StepContext(
        run_id=run_id,
        kind=mine.kind,
        phase=phase,
        step=name,
        tenant_id=mine.tenant_id,
        input=mine.input,
        outputs=outputs,
        attempt=mine.attempts,
        error=mine.error,
    )
    return Claim("claimed", context=context)


def complete_step(
    session: Session, *, run_id: str, phase: str, name: str, output: dict[str, Any], grace: float
) -> bool:
    """Record the step's output and move the run on; False if another delivery beat us."""
    now = utcnow()
    done = _rowcount(
        session,
        update(StepRun)
        .where(
            StepRun.run_id == run_id,
            StepRun.phase == phase,
            StepRun.name == name,
            StepRun.status == "running",
        )
        .values(status="done", output=output, finished_at=now, lease_until=None)
        .execution_options(synchronize_session=False),
    )
    if not done:
        return False
    _advance(session, run_id=run_id, phase=phase, now=now, grace=grace)
    return True


def _advance(session: Session, *, run_id: str, phase: str, now: dt.datetime, grace: float) -> None:
    """Point the run at its next step, or finish it after the phase's last step (one UPDATE)."""
    following = (
        select(StepRun.name)
        .where(StepRun.run_id == run_id, StepRun.phase == phase, StepRun.status.not_in(FINISHED))
        .order_by(StepRun.position)
        .limit(1)
        .scalar_subquery()
    )
    last = following.is_(None)
    final = "succeeded" if phase == FORWARD else "failed"
    status, kind = session.execute(
        update(WorkflowRun)
        .where(WorkflowRun.id == run_id)
        .values(
            current_step=following,
            status=case((last, final), else_=WorkflowRun.status),
            deadline_at=case((last, None), else_=now + dt.timedelta(seconds=grace)),
            finished_at=case((last, now), else_=None),
            updated_at=now,
        )
        .returning(WorkflowRun.status, WorkflowRun.kind)
        .execution_options(synchronize_session=False)
    ).one()
    if status in FINAL_RUN:
        log.info("workflow_finished", workflow_id=run_id, kind=kind, status=status)


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
    failed = _rowcount(
        session,
        update(StepRun)
        .where(
            StepRun.run_id == run_id,
            StepRun.phase == phase,
            StepRun.name == name,
            StepRun.status == "running",
        )
        .values(status="failed", error=error, finished_at=now, lease_until=None)
        .execution_options(synchronize_session=False),
    )
    run = session.get(WorkflowRun, run_id)
    if not failed or run is None:
        return []
    if phase == COMPENSATE:
        errors = [*(run.error or {}).get("compensation_errors", []), {"step": name, **error}]
        run.error = {**(run.error or {}), "compensation_errors": errors}
        _advance(session, run_id=run_id, phase=phase, now=now, grace=grace)
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
    _rowcount(
        session,
        update(StepRun)
        .where(StepRun.run_id == run_id, StepRun.phase == phase, StepRun.name == name)
        .values(**values)
        .execution_options(synchronize_session=False),
    )
    _rowcount(
        session,
        update(WorkflowRun)
        .where(WorkflowRun.id == run_id)
        .values(deadline_at=due + dt.timedelta(seconds=30), updated_at=now),
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
        flipped = _rowcount(
            session,
            update(StepRun)
            .where(StepRun.id == step_id, StepRun.status == "waiting")
            .values(status="pending", due_at=None)
            .execution_options(synchronize_session=False),
        )
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
        if (
            current.status in ("running", "retrying")
            and current.lease_until
            and current.lease_until > now
        ):
            busy_until = current.lease_until
        elif current.status == "waiting" and current.due_at and current.due_at > now:
            busy_until = current.due_at
        new_deadline = (busy_until or now) + dt.timedelta(seconds=grace)
        moved = _rowcount(
            session,
            update(WorkflowRun)
            .where(WorkflowRun.id == run.id, WorkflowRun.deadline_at == run.deadline_at)
            .values(deadline_at=new_deadline)
            .execution_options(synchronize_session=False),
        )
        if moved and busy_until is None:
            if current.status == "waiting":
                current.status, current.due_at = "pending", None
            log.warning("workflow_stalled", workflow_id=run.id, step=current.name)
            taken.append((run.id, run.phase, next_pending(session, run)))
    return taken
