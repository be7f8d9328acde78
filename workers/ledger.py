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
from sqlalchemy import bindparam, case, select, update

from workers.models import StepRun, UTCDateTime, WorkflowRun, utcnow
from workers.workflow import COMPENSATE, FORWARD, StepContext, get_workflow

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult
    from sqlalchemy import CursorResult, Table, Update
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
    from workers.events import emit

    emit(
        "workflow.started",
        tenant_id=tenant_id,
        workflow_id=run.id,
        subject=kind,
        data={"kind": kind},
    )
    return run


def dispatch(app: Celery, run_id: str, phase: str, tasks: list[str]) -> AsyncResult[Any] | None:
    """Send the remaining ``tasks`` of a phase as one chain of immutable signatures.

    Returns the result of the chain's last step, whose result alone is kept, so
    a caller can wait for the phase to end without polling the database.
    """
    if not tasks:
        return None
    kwargs = {"run_id": run_id, "phase": phase}
    signatures = [app.signature(name, kwargs=kwargs, immutable=True) for name in tasks]
    signatures[-1].options["ignore_result"] = False
    result: AsyncResult[Any] = chain(*signatures).apply_async()
    log.debug("workflow_dispatched", workflow_id=run_id, phase=phase, first=tasks[0])
    return result


@dataclass(frozen=True)
class Claim:
    """What a delivery of a step found: run it, its stored output, or nothing to do."""

    outcome: Literal["claimed", "done", "busy", "inactive"]
    context: StepContext | None = None
    output: dict[str, Any] | None = None
    #: For ``done``: whether the step after it is still untouched (continue the chain).
    successor_pending: bool = False


_steps = cast("Table", StepRun.__table__)
_runs = cast("Table", WorkflowRun.__table__)

# The hot path's statements are built once, with bind parameters, and run on the
# Core connection: no per-call expression building, no ORM bookkeeping.

#: Everything a delivery needs to decide and to run: the run and all its steps.
_READ_RUN = (
    select(
        _steps.c.phase,
        _steps.c.position,
        _steps.c.name,
        _steps.c.status,
        _steps.c.output,
        _steps.c.attempts,
        _steps.c.task_id,
        _steps.c.lease_until,
        _steps.c.due_at,
        _runs.c.kind,
        _runs.c.tenant_id,
        _runs.c.input,
        _runs.c.error,
        _runs.c.status.label("run_status"),
        _runs.c.phase.label("run_phase"),
    )
    .join(_runs, _runs.c.id == _steps.c.run_id)
    .where(_steps.c.run_id == bindparam("b_run_id"))
    .order_by(_steps.c.phase, _steps.c.position)
)

#: Take a step that nobody holds; only one delivery can change the row.
_CLAIM = (
    update(_steps)
    .where(
        _steps.c.run_id == bindparam("b_run_id"),
        _steps.c.phase == bindparam("b_phase"),
        _steps.c.name == bindparam("b_name"),
        _steps.c.status.not_in(FINISHED),
        # A live lease belongs to another delivery that is running the step now.
        ~(
            (_steps.c.status == "running")
            & (_steps.c.lease_until > bindparam("b_now", type_=UTCDateTime()))
        ),
        ~(
            (_steps.c.status == "waiting")
            & (_steps.c.due_at > bindparam("b_now", type_=UTCDateTime()))
        ),
    )
    .values(
        status="running",
        attempts=_steps.c.attempts + 1,
        lease_until=bindparam("b_lease_until", type_=UTCDateTime()),
        task_id=bindparam("b_task_id"),
        started_at=bindparam("b_now", type_=UTCDateTime()),
    )
)

#: Record a running step's output.
_COMPLETE = (
    update(_steps)
    .where(
        _steps.c.run_id == bindparam("b_run_id"),
        _steps.c.phase == bindparam("b_phase"),
        _steps.c.name == bindparam("b_name"),
        _steps.c.status == "running",
    )
    .values(
        status="done",
        output=bindparam("b_output"),
        finished_at=bindparam("b_now", type_=UTCDateTime()),
        lease_until=None,
    )
)

#: Hand the next step to the chain message that will carry it (see complete_step).
_HAND_OVER = (
    update(_steps)
    .where(
        _steps.c.run_id == bindparam("b_run_id"),
        _steps.c.phase == bindparam("b_phase"),
        _steps.c.name == bindparam("b_name"),
        _steps.c.status == "pending",
    )
    .values(
        status="running",
        attempts=_steps.c.attempts + 1,
        lease_until=bindparam("b_lease_until", type_=UTCDateTime()),
        task_id=bindparam("b_task_id"),
        started_at=bindparam("b_now", type_=UTCDateTime()),
    )
)

_following = (
    select(_steps.c.name)
    .where(
        _steps.c.run_id == bindparam("b_run_id"),
        _steps.c.phase == bindparam("b_phase"),
        _steps.c.status.not_in(FINISHED),
    )
    .order_by(_steps.c.position)
    .limit(1)
    .scalar_subquery()
)

#: Point the run at its next step, or finish it after its phase's last step.
_ADVANCE = (
    update(_runs)
    .where(_runs.c.id == bindparam("b_run_id"))
    .values(
        current_step=_following,
        status=case((_following.is_(None), bindparam("b_final")), else_=_runs.c.status),
        deadline_at=case(
            (_following.is_(None), None), else_=bindparam("b_deadline", type_=UTCDateTime())
        ),
        finished_at=case(
            (_following.is_(None), bindparam("b_now", type_=UTCDateTime())), else_=None
        ),
        updated_at=bindparam("b_now", type_=UTCDateTime()),
    )
    .returning(_runs.c.status, _runs.c.kind)
)


def claim_step(
    session: Session, *, run_id: str, phase: str, name: str, task_id: str | None, lease: float
) -> Claim:
    """Take the step for this delivery, unless it is done, leased or its run moved on.

    One read of the run and its steps; then, unless the previous step already
    handed this step to this very message, one guarded UPDATE that only one
    delivery can win. This is the ledger's hot path.
    """
    now = utcnow()
    conn = session.connection()
    rows = conn.execute(_READ_RUN, {"b_run_id": run_id}).all()
    phase_rows = [row for row in rows if row.phase == phase]
    mine = next((row for row in phase_rows if row.name == name), None)
    if mine is None:
        return Claim("inactive")
    if mine.status in FINISHED:
        later = [row for row in phase_rows if row.position > mine.position]
        pending = bool(later) and later[0].status == "pending"
        return Claim("done", output=mine.output or {}, successor_pending=pending)
    if mine.run_status != PHASE_STATUS.get(phase) or mine.run_phase != phase:
        return Claim("inactive")
    handed_over = (
        mine.status == "running"
        and task_id is not None
        and mine.task_id == task_id
        and mine.lease_until is not None
        and mine.lease_until.replace(tzinfo=dt.UTC) > now
    )
    attempt = mine.attempts
    if not handed_over:
        claimed = conn.execute(
            _CLAIM,
            {
                "b_run_id": run_id,
                "b_phase": phase,
                "b_name": name,
                "b_now": now,
                "b_lease_until": now + dt.timedelta(seconds=lease),
                "b_task_id": task_id,
            },
        )
        if not cast("CursorResult[Any]", claimed).rowcount:
            return Claim("busy")
        attempt += 1
    successors = [str(row.name) for row in phase_rows if row.position > mine.position]
    outputs = {r.name: r.output or {} for r in rows if r.phase == FORWARD and r.status == "done"}
    context = StepContext(
        run_id=run_id,
        kind=mine.kind,
        phase=phase,
        step=name,
        tenant_id=mine.tenant_id,
        input=mine.input,
        outputs=outputs,
        attempt=attempt,
        error=mine.error,
        next_step=successors[0] if successors else None,
    )
    return Claim("claimed", context=context)


def complete_step(
    session: Session,
    *,
    run_id: str,
    phase: str,
    name: str,
    output: dict[str, Any],
    grace: float,
    next_step: str | None = None,
    next_task_id: str | None = None,
    lease: float = 0.0,
) -> bool:
    """Record the step's output and move the run on; False if another delivery beat us.

    With ``next_task_id`` (the id of the chain message that carries
    ``next_step``), the next step is claimed for that message in the same
    transaction, so its delivery starts without a write of its own.
    """
    now = utcnow()
    conn = session.connection()
    done = conn.execute(
        _COMPLETE,
        {"b_run_id": run_id, "b_phase": phase, "b_name": name, "b_output": output, "b_now": now},
    )
    if not cast("CursorResult[Any]", done).rowcount:
        return False
    if next_step is not None and next_task_id is not None:
        conn.execute(
            _HAND_OVER,
            {
                "b_run_id": run_id,
                "b_phase": phase,
                "b_name": next_step,
                "b_now": now,
                "b_lease_until": now + dt.timedelta(seconds=lease),
                "b_task_id": next_task_id,
            },
        )
    _advance(session, run_id=run_id, phase=phase, now=now, grace=grace)
    return True


def _advance(session: Session, *, run_id: str, phase: str, now: dt.datetime, grace: float) -> None:
    """Point the run at its next step, or finish it after the phase's last step (one UPDATE)."""
    status, kind = (
        session.connection()
        .execute(
            _ADVANCE,
            {
                "b_run_id": run_id,
                "b_phase": phase,
                "b_final": "succeeded" if phase == FORWARD else "failed",
                "b_deadline": now + dt.timedelta(seconds=grace),
                "b_now": now,
            },
        )
        .one()
    )
    if status in FINAL_RUN:
        log.info("workflow_finished", workflow_id=run_id, kind=kind, status=status)
        _finished_event(session, run_id, kind, status, now)


def _finished_event(
    session: Session, run_id: str, kind: str, status: str, now: dt.datetime
) -> None:
    from workers.events import emit

    run = session.get(WorkflowRun, run_id)
    duration = (now - run.created_at).total_seconds() if run is not None else None
    emit(
        "workflow.succeeded" if status == "succeeded" else "workflow.failed",
        tenant_id=run.tenant_id if run is not None else None,
        workflow_id=run_id,
        subject=kind,
        data={"kind": kind, "status": status, "duration_seconds": duration},
    )


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
        _finished_event(session, run_id, run.kind, "failed", now)
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
