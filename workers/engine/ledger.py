"""The workflow ledger: runs and steps in the database, advanced by Celery chains.

Each step is a Celery task that first *claims* its row, does its work, then
*completes* it. A row that is already done makes a repeated delivery a no-op.
A claim names its owner, the process's boot id (:mod:`workers.runtime.liveness`), whose
heartbeat renews the step while it runs: a concurrent delivery steps aside for a
renewed step, and takes over one whose owner stopped renewing it for
``owner_timeout``, recording the takeover in the step's history. The lease only
bounds a step whose owner is alive but hung. Every claim bumps ``attempts``, and
completions are fenced on it: a late completion by a process that lost its step
is refused. The database is the truth: ``tick`` dispatches due waits and
``reconcile`` resumes runs whose owner died or whose message was lost.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import structlog
from celery import chain
from sqlalchemy import JSON, bindparam, case, exists, or_, select, update
from sqlalchemy.orm import Session

from schemas.states import FINAL_RUN, FINISHED, PHASE_STATUS, Phase, RunStatus, StepStatus
from workers.engine.events import emit
from workers.engine.takeover import OWNER_COLUMNS, Owner, verdict
from workers.engine.workflow import (
    StepContext,
    get_workflow,
)
from workers.runtime.models import StepRun, UTCDateTime, WorkerProcess, WorkflowRun, utcnow

if TYPE_CHECKING:
    from collections.abc import Sequence

    from celery import Celery
    from celery.result import AsyncResult
    from sqlalchemy import Connection, CursorResult, Table, Update

__all__ = [
    "Claim",
    "claim_step",
    "complete_step",
    "dispatch",
    "due_waits",
    "fail_step",
    "new_run",
    "next_pending",
    "pending_tasks",
    "refuse_late",
    "stalled_runs",
    "unstarted",
    "wait_step",
]

log = structlog.get_logger(__name__)


def _connection(db: Session | Connection) -> Connection:
    """The Core connection under ``db``: the hot path passes one, tools and tests a session."""
    return db.connection() if isinstance(db, Session) else db


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
        status=RunStatus.RUNNING,
        phase=Phase.FORWARD,
        current_step=workflow.forward_tasks[0],
        input=input,
        deadline_at=now + dt.timedelta(seconds=grace),
        created_at=now,
        updated_at=now,
    )
    session.add(run)
    session.flush()  # the run row first: step rows reference it
    session.add_all(
        StepRun(
            run_id=run.id, phase=Phase.FORWARD, position=i, name=name, status=StepStatus.PENDING
        )
        for i, name in enumerate(workflow.forward_tasks)
    )
    emit(
        "workflow.started",
        tenant_id=tenant_id,
        workflow_id=run.id,
        subject=kind,
        data={"kind": kind},
    )
    return run


def dispatch(
    app: Celery, run_id: str, phase: str, tasks: list[str], *, first_task_id: str | None = None
) -> AsyncResult[Any] | None:
    """Send the remaining ``tasks`` of a phase as one chain of immutable signatures.

    Returns the result of the chain's last step, whose result alone is kept, so
    a caller can wait for the phase to end without polling the database.
    ``first_task_id`` is the message id the first step was handed to.
    """
    if not tasks:
        return None
    kwargs = {"run_id": run_id, "phase": phase}
    signatures = [app.signature(name, kwargs=kwargs, immutable=True) for name in tasks]
    if first_task_id is not None:
        signatures[0].set(task_id=first_task_id)
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
    #: For ``claimed``: the step row's id, which the owner's heartbeat renews.
    step_id: int | None = None
    #: For ``claimed``: the takeover recorded in the step's history, if this claim was one.
    takeover: dict[str, Any] | None = None


_steps = cast("Table", StepRun.__table__)
_runs = cast("Table", WorkflowRun.__table__)
_workers = cast("Table", WorkerProcess.__table__)

# The hot path's statements are built once, with bind parameters, and run on the
# Core connection: no per-call expression building, no ORM bookkeeping.

#: Everything a delivery needs to decide and to run: the run and all its steps.
_READ_RUN = (
    select(
        _steps.c.id,
        _steps.c.phase,
        _steps.c.position,
        _steps.c.name,
        _steps.c.status,
        _steps.c.output,
        _steps.c.attempts,
        _steps.c.task_id,
        _steps.c.lease_until,
        _steps.c.due_at,
        _steps.c.owner_id,
        _steps.c.heartbeat_at,
        _steps.c.history,
        *OWNER_COLUMNS,
        _runs.c.kind,
        _runs.c.tenant_id,
        _runs.c.input,
        _runs.c.error,
        _runs.c.status.label("run_status"),
        _runs.c.phase.label("run_phase"),
    )
    .join(_runs, _runs.c.id == _steps.c.run_id)
    .outerjoin(_workers, _workers.c.boot_id == _steps.c.owner_id)
    .where(_steps.c.run_id == bindparam("b_run_id"))
    .order_by(_steps.c.phase, _steps.c.position)
)

#: What a claim writes: the step runs now, owned by this process, one attempt more.
_CLAIMED = {
    "status": StepStatus.RUNNING,
    "attempts": _steps.c.attempts + 1,
    "owner_id": bindparam("b_owner"),
    "heartbeat_at": bindparam("b_now", type_=UTCDateTime()),
    "lease_until": bindparam("b_lease_until", type_=UTCDateTime()),
    "task_id": bindparam("b_task_id"),
    "started_at": bindparam("b_now", type_=UTCDateTime()),
}

#: Take the step the read found claimable. Every claim bumps ``attempts``, so the
#: guard on the attempts read is a compare-and-swap: of two deliveries that read
#: the same row, only one changes it.
_CLAIM = (
    update(_steps)
    .where(
        _steps.c.id == bindparam("b_id"),
        _steps.c.attempts == bindparam("b_attempts"),
        _steps.c.status == bindparam("b_status"),
    )
    .values(**_CLAIMED)
)

#: PostgreSQL: the common case, a step nobody has started, in one statement. The claim is
#: a guarded UPDATE in a CTE (pending or retrying, its run in this phase); the SELECT beside
#: it reads the run and its steps as they were when the statement began. Of two deliveries
#: the second's UPDATE waits for the first's row lock, then finds the step running and
#: changes nothing: ``claimed_id`` is NULL and the delivery decides from the rows it read,
#: exactly as after :data:`_READ_RUN`.
_CLAIM_PENDING = (
    update(_steps)
    .where(
        _steps.c.run_id == bindparam("b_run_id"),
        _steps.c.phase == bindparam("b_phase"),
        _steps.c.name == bindparam("b_name"),
        # Plain comparisons, not IN: an expanding IN is rendered again at every execution.
        or_(_steps.c.status == StepStatus.PENDING, _steps.c.status == StepStatus.RETRYING),
        exists().where(
            _runs.c.id == bindparam("b_run_id"),
            _runs.c.status == bindparam("b_run_status"),
            _runs.c.phase == bindparam("b_phase"),
        ),
    )
    .values(**_CLAIMED)
    .returning(_steps.c.id)
    .cte("claimed")
)
_READ_AND_CLAIM = _READ_RUN.add_columns(
    select(_CLAIM_PENDING.c.id).scalar_subquery().label("claimed_id")
)

#: The same claim as a takeover, which also records it in the step's history.
_TAKE = _CLAIM.values(history=bindparam("b_history", type_=JSON()))

#: The owner's attempt, and only it, may record the step's outcome.
_FENCE = (
    (_steps.c.run_id == bindparam("b_run_id"))
    & (_steps.c.phase == bindparam("b_phase"))
    & (_steps.c.name == bindparam("b_name"))
    & (_steps.c.status == StepStatus.RUNNING)
    & (_steps.c.attempts == bindparam("b_attempt"))
    & (_steps.c.owner_id == bindparam("b_owner"))
)

#: Record a running step's output.
_COMPLETE = (
    update(_steps)
    .where(_FENCE)
    .values(
        status=StepStatus.DONE,
        output=bindparam("b_output"),
        finished_at=bindparam("b_now", type_=UTCDateTime()),
        lease_until=None,
    )
)

#: Hand the next step to the chain message that will carry it: a note of which
#: message should run it, not a lease; the lease starts when a worker starts it.
_HAND_OVER = (
    update(_steps)
    .where(
        _steps.c.run_id == bindparam("b_run_id"),
        _steps.c.phase == bindparam("b_phase"),
        _steps.c.name == bindparam("b_name"),
        _steps.c.status == StepStatus.PENDING,
    )
    .values(task_id=bindparam("b_task_id"))
)

_following = (
    select(_steps.c.name)
    .where(
        _steps.c.run_id == bindparam("b_run_id"),
        _steps.c.phase == bindparam("b_phase"),
        *(_steps.c.status != status for status in sorted(FINISHED)),
    )
    .order_by(_steps.c.position)
    .limit(1)
    .scalar_subquery()
)


def _advanced(following: Any) -> dict[str, Any]:
    """The run pointed at ``following`` (a scalar subquery), or finished when it is NULL."""
    return {
        "current_step": following,
        "status": case((following.is_(None), bindparam("b_final")), else_=_runs.c.status),
        "deadline_at": case(
            (following.is_(None), None), else_=bindparam("b_deadline", type_=UTCDateTime())
        ),
        "finished_at": case(
            (following.is_(None), bindparam("b_now", type_=UTCDateTime())), else_=None
        ),
        "updated_at": bindparam("b_now", type_=UTCDateTime()),
    }


#: What a run's advance returns: enough to tell that it finished, with no second read.
_ADVANCED = (_runs.c.status, _runs.c.kind, _runs.c.tenant_id, _runs.c.created_at)

#: Point the run at its next step, or finish it after its phase's last step.
_ADVANCE = (
    update(_runs)
    .where(_runs.c.id == bindparam("b_run_id"))
    .values(**_advanced(_following))
    .returning(*_ADVANCED)
)

#: PostgreSQL: a completion in one statement. Record the output (fenced), hand the next
#: step to its message and move the run on, each only if the fenced write changed a row.
#: All three see the snapshot from before the statement, where this step still runs: the
#: run's next step is the first unfinished one *other than this one*.
_DONE = (
    update(_steps)
    .where(_FENCE)
    .values(
        status=StepStatus.DONE,
        output=bindparam("b_output"),
        finished_at=bindparam("b_now", type_=UTCDateTime()),
        lease_until=None,
    )
    .returning(_steps.c.id)
    .cte("done")
)
_HANDED = (
    update(_steps)
    .where(
        _steps.c.run_id == bindparam("b_run_id"),
        _steps.c.phase == bindparam("b_phase"),
        _steps.c.name == bindparam("b_next_step"),
        _steps.c.status == StepStatus.PENDING,
        exists(select(_DONE.c.id)),
    )
    .values(task_id=bindparam("b_task_id"))
    .cte("handed")
)
_NEXT = (
    select(_steps.c.name)
    .where(
        _steps.c.run_id == bindparam("b_run_id"),
        _steps.c.phase == bindparam("b_phase"),
        *(_steps.c.status != status for status in sorted(FINISHED)),
        _steps.c.name != bindparam("b_name"),
    )
    .order_by(_steps.c.position)
    .limit(1)
    .cte("next")
)
_COMPLETE_AND_ADVANCE = (
    update(_runs)
    .where(_runs.c.id == bindparam("b_run_id"), exists(select(_DONE.c.id)))
    .values(**_advanced(select(_NEXT.c.name).scalar_subquery()))
    .returning(*_ADVANCED)
    .add_cte(_DONE, _HANDED, _NEXT)
)


def claim_step(
    db: Session | Connection,
    *,
    run_id: str,
    phase: str,
    name: str,
    task_id: str | None,
    lease: float,
    owner: Owner,
    next_task_id: str | None = None,
    by: str = "delivery",
) -> Claim:
    """Take the step for this delivery, unless it is done, renewed by its owner or moved on.

    One read of the run and its steps, then one compare-and-swap UPDATE that only
    one delivery can win. This is the ledger's hot path.
    """
    now = utcnow()
    conn = _connection(db)
    claim = {
        "b_run_id": run_id,
        "b_owner": owner.boot_id,
        "b_now": now,
        "b_lease_until": now + dt.timedelta(seconds=lease),
        "b_task_id": task_id,
    }
    if conn.dialect.name == "postgresql":
        rows = conn.execute(
            _READ_AND_CLAIM,
            {**claim, "b_phase": phase, "b_name": name, "b_run_status": PHASE_STATUS.get(phase)},
        ).all()
    else:
        rows = conn.execute(_READ_RUN, {"b_run_id": run_id}).all()
    phase_rows = [row for row in rows if row.phase == phase]
    mine = next((row for row in phase_rows if row.name == name), None)
    if mine is None:
        return Claim("inactive")
    if getattr(mine, "claimed_id", None) is not None:
        context = _claimed_context(rows, phase_rows, mine, run_id=run_id, phase=phase, name=name)
        return Claim("claimed", context=context, step_id=int(mine.id))
    if mine.status in FINISHED:
        later = [row for row in phase_rows if row.position > mine.position]
        pending = _untouched(later, next_task_id)
        return Claim("done", output=mine.output or {}, successor_pending=pending)
    if mine.run_status != PHASE_STATUS.get(phase) or mine.run_phase != phase:
        return Claim("inactive")
    decision, takeover = verdict(mine, now=now, owner=owner)
    if decision == "busy":
        return Claim("busy")
    if takeover is not None:
        takeover = {**takeover, "by": by}
    claimed = conn.execute(
        _CLAIM if takeover is None else _TAKE,
        {
            **claim,
            "b_id": mine.id,
            "b_attempts": mine.attempts,
            "b_status": mine.status,
            "b_history": [*(mine.history or []), takeover],
        },
    )
    if not cast("CursorResult[Any]", claimed).rowcount:
        return Claim("busy")
    context = _claimed_context(rows, phase_rows, mine, run_id=run_id, phase=phase, name=name)
    return Claim("claimed", context=context, step_id=int(mine.id), takeover=takeover)


def _claimed_context(
    rows: Sequence[Any], phase_rows: list[Any], mine: Any, *, run_id: str, phase: str, name: str
) -> StepContext:
    """What the body of the step just claimed sees: its input, earlier outputs, its place."""
    successors = [str(row.name) for row in phase_rows if row.position > mine.position]
    outputs = {
        r.name: r.output or {}
        for r in rows
        if r.phase == Phase.FORWARD and r.status == StepStatus.DONE
    }
    return StepContext(
        run_id=run_id,
        kind=mine.kind,
        phase=phase,
        step=name,
        tenant_id=mine.tenant_id,
        input=mine.input,
        outputs=outputs,
        attempt=mine.attempts + 1,
        error=mine.error,
        next_step=successors[0] if successors else None,
    )


def _untouched(later: list[Any], next_task_id: str | None) -> bool:
    """Whether a redelivery of a done step should carry its chain on.

    Yes when the next step is still pending and was handed to no message, or to
    the very message this chain carries next (it may never have been sent: its
    sender died between recording the step and publishing). A next step handed
    to another chain (reconcile's) is that chain's to run.
    """
    if not later or later[0].status != StepStatus.PENDING:
        return False
    return later[0].task_id is None or next_task_id is None or later[0].task_id == next_task_id


def complete_step(
    db: Session | Connection,
    *,
    run_id: str,
    phase: str,
    name: str,
    output: dict[str, Any],
    grace: float,
    attempt: int,
    owner: str,
    next_step: str | None = None,
    next_task_id: str | None = None,
) -> bool:
    """Record the step's output and move the run on; False if this attempt lost the step.

    Fenced on the attempt and its owner: a process that was frozen past the owner
    timeout and whose step was taken over gets False, and changes nothing. With
    ``next_task_id`` (the id of the chain message that carries ``next_step``),
    the next step is noted as handed to that message.
    """
    now = utcnow()
    conn = _connection(db)
    fence = {"b_run_id": run_id, "b_phase": phase, "b_name": name, "b_attempt": attempt}
    if conn.dialect.name == "postgresql":
        advanced = conn.execute(
            _COMPLETE_AND_ADVANCE,
            {
                **fence,
                **_advance_params(phase, now=now, grace=grace),
                "b_owner": owner,
                "b_output": output,
                "b_next_step": next_step if next_task_id is not None else None,
                "b_task_id": next_task_id,
            },
        ).first()
        if advanced is None:
            return _recorded_by(conn, run_id, phase, name, attempt=attempt, owner=owner)
        _advanced_to(run_id, advanced, now=now)
        return True
    done = conn.execute(_COMPLETE, {**fence, "b_owner": owner, "b_output": output, "b_now": now})
    if not cast("CursorResult[Any]", done).rowcount:
        # A retried write whose first try did commit finds its own outcome recorded.
        return _recorded_by(conn, run_id, phase, name, attempt=attempt, owner=owner)
    if next_step is not None and next_task_id is not None:
        conn.execute(
            _HAND_OVER,
            {"b_run_id": run_id, "b_phase": phase, "b_name": next_step, "b_task_id": next_task_id},
        )
    _advance(conn, run_id=run_id, phase=phase, now=now, grace=grace)
    return True


def _recorded_by(
    conn: Connection, run_id: str, phase: str, name: str, *, attempt: int, owner: str
) -> bool:
    row = conn.execute(
        select(StepRun.status, StepRun.attempts, StepRun.owner_id).where(
            StepRun.run_id == run_id, StepRun.phase == phase, StepRun.name == name
        )
    ).first()
    return (
        row is not None
        and row.status == StepStatus.DONE
        and (row.attempts, row.owner_id)
        == (
            attempt,
            owner,
        )
    )


def refuse_late(
    session: Session, *, run_id: str, phase: str, name: str, attempt: int, owner: str
) -> None:
    """Note in the step's history that a taken-over attempt finished late and was refused."""
    step = session.scalars(
        select(StepRun).where(
            StepRun.run_id == run_id, StepRun.phase == phase, StepRun.name == name
        )
    ).first()
    if step is None:
        return
    entry = {
        "event": "late_completion_refused",
        "at": utcnow().isoformat(),
        "attempt": attempt,
        "owner": owner,
    }
    _rowcount(
        session,
        update(StepRun)
        .where(StepRun.id == step.id, StepRun.attempts == step.attempts)
        .values(history=[*(step.history or []), entry])
        .execution_options(synchronize_session=False),
    )


def _advance_params(phase: str, *, now: dt.datetime, grace: float) -> dict[str, Any]:
    return {
        "b_phase": phase,
        "b_final": RunStatus.SUCCEEDED if phase == Phase.FORWARD else RunStatus.FAILED,
        "b_deadline": now + dt.timedelta(seconds=grace),
        "b_now": now,
    }


def _advance(conn: Connection, *, run_id: str, phase: str, now: dt.datetime, grace: float) -> None:
    """Point the run at its next step, or finish it after the phase's last step (one UPDATE)."""
    advanced = conn.execute(
        _ADVANCE, {"b_run_id": run_id, **_advance_params(phase, now=now, grace=grace)}
    ).one()
    _advanced_to(run_id, advanced, now=now)


def _advanced_to(run_id: str, advanced: Any, *, now: dt.datetime) -> None:
    """Tell that the run finished, when the step just recorded was its last (a row of _ADVANCED)."""
    if advanced.status in FINAL_RUN:
        log.info(
            "workflow_finished", workflow_id=run_id, kind=advanced.kind, status=advanced.status
        )
        _finished_event(run_id, advanced, now=now)


def _finished_event(run_id: str, run: Any, *, now: dt.datetime) -> None:
    """``workflow.succeeded`` or ``workflow.failed`` for a run (kind, status, tenant, start)."""
    emit(
        "workflow.succeeded" if run.status == RunStatus.SUCCEEDED else "workflow.failed",
        tenant_id=run.tenant_id,
        workflow_id=run_id,
        subject=run.kind,
        data={
            "kind": run.kind,
            "status": run.status,
            "duration_seconds": (now - run.created_at).total_seconds(),
        },
    )


def fail_step(
    session: Session,
    *,
    run_id: str,
    phase: str,
    name: str,
    error: dict[str, Any],
    grace: float,
    attempt: int,
    owner: str,
) -> list[str] | None:
    """Record a failed step; returns the compensation tasks to dispatch (forward phase).

    In the compensation phase a failure is recorded on the run and the remaining
    compensations carry on, so as much as possible is cleaned up. ``None``: this
    attempt lost the step (fenced like :func:`complete_step`) and recorded nothing.
    """
    now = utcnow()
    fence = {"b_run_id": run_id, "b_phase": phase, "b_name": name, "b_attempt": attempt}
    failed = (
        session.connection()
        .execute(
            update(_steps)
            .where(_FENCE)
            .values(status=StepStatus.FAILED, error=error, finished_at=now, lease_until=None),
            {**fence, "b_owner": owner},
        )
        .rowcount
    )
    if not failed:
        return None
    run = session.get(WorkflowRun, run_id)
    if run is None:
        return []
    if phase == Phase.COMPENSATE:
        errors = [*(run.error or {}).get("compensation_errors", []), {"step": name, **error}]
        run.error = {**(run.error or {}), "compensation_errors": errors}
        _advance(session.connection(), run_id=run_id, phase=phase, now=now, grace=grace)
        return []
    run.error = {"step": name, **error}
    log.warning("workflow_compensating", workflow_id=run_id, step=name, error=error)
    return _compensate(session, run, now=now, grace=grace)


def _compensate(session: Session, run: WorkflowRun, *, now: dt.datetime, grace: float) -> list[str]:
    """Turn a failed run to compensating its done steps, in reverse; failed if there are none."""
    done = session.scalars(
        select(StepRun.name).where(
            StepRun.run_id == run.id,
            StepRun.phase == Phase.FORWARD,
            StepRun.status == StepStatus.DONE,
        )
    ).all()
    tasks = get_workflow(run.kind).compensations_for(list(done))
    if not tasks:
        run.status, run.finished_at = RunStatus.FAILED, now
        run.current_step, run.deadline_at = None, None
        _finished_event(run.id, run, now=now)
        return []
    session.add_all(
        StepRun(
            run_id=run.id, phase=Phase.COMPENSATE, position=i, name=task, status=StepStatus.PENDING
        )
        for i, task in enumerate(tasks)
    )
    run.status, run.phase, run.current_step = RunStatus.COMPENSATING, Phase.COMPENSATE, tasks[0]
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
    attempt: int,
    owner: str,
    slack: float,
) -> bool:
    """Park the step until ``delay`` has passed; False if this attempt lost the step.

    ``in_ledger``: the tick dispatches it when due (long waits never sit in the
    broker); otherwise a short broker countdown is under way, and reconcile takes
    the step back if that message has not claimed it ``slack`` seconds after due.
    """
    now = utcnow()
    due = now + dt.timedelta(seconds=delay)
    values: dict[str, Any] = {"error": error, "lease_until": None, "owner_id": None}
    if in_ledger:
        values.update(status=StepStatus.WAITING, due_at=due)
    else:
        values.update(
            status=StepStatus.RETRYING, due_at=due, lease_until=due + dt.timedelta(seconds=slack)
        )
    fence = {"b_run_id": run_id, "b_phase": phase, "b_name": name, "b_attempt": attempt}
    parked = (
        session.connection()
        .execute(update(_steps).where(_FENCE).values(**values), {**fence, "b_owner": owner})
        .rowcount
    )
    if not parked:
        return False
    _rowcount(
        session,
        update(WorkflowRun)
        .where(WorkflowRun.id == run_id)
        .values(deadline_at=due + dt.timedelta(seconds=30), updated_at=now),
    )
    return True


def next_pending(session: Session, run: WorkflowRun) -> list[str]:
    """The unfinished steps of the run's current phase, in order."""
    return pending_tasks(session, run.id, run.phase)


def pending_tasks(session: Session, run_id: str, phase: str) -> list[str]:
    """The unfinished steps of one phase of a run, in order."""
    return list(
        session.scalars(
            select(StepRun.name)
            .where(
                StepRun.run_id == run_id,
                StepRun.phase == phase,
                StepRun.status.not_in(FINISHED),
            )
            .order_by(StepRun.position)
        ).all()
    )


def unstarted(session: Session, run_id: str | None) -> list[tuple[str, str, list[str]]]:
    """The run's phase again, ``[(run_id, phase, tasks)]``, if no step of it ever started.

    For a redelivered public call whose first delivery committed the run and died
    before sending it: sending again at worst duplicates a message the ledger turns away.
    """
    run = session.get(WorkflowRun, run_id) if run_id else None
    if run is None or run.status not in PHASE_STATUS.values():
        return []
    started = session.scalars(
        select(StepRun.id).where(
            StepRun.run_id == run.id, StepRun.phase == run.phase, StepRun.attempts > 0
        )
    ).first()
    return [] if started is not None else [(run.id, run.phase, next_pending(session, run))]


def due_waits(session: Session, *, limit: int = 500) -> list[tuple[str, str, list[str]]]:
    """Take the waits that are due: ``(run_id, phase, tasks from the step on)`` each.

    Each row is flipped to ``pending`` with a guarded update, so two ticks never
    dispatch the same wait twice.
    """
    now = utcnow()
    rows = session.execute(
        select(StepRun.id, StepRun.run_id, StepRun.phase)
        .join(WorkflowRun, WorkflowRun.id == StepRun.run_id)
        .where(StepRun.status == StepStatus.WAITING, StepRun.due_at <= now)
        .where(WorkflowRun.status.in_(PHASE_STATUS.values()))
        .limit(limit)
    ).all()
    taken: list[tuple[str, str, list[str]]] = []
    for step_id, run_id, phase in rows:
        flipped = _rowcount(
            session,
            update(StepRun)
            .where(StepRun.id == step_id, StepRun.status == StepStatus.WAITING)
            .values(status=StepStatus.PENDING, due_at=None)
            .execution_options(synchronize_session=False),
        )
        run = session.get(WorkflowRun, run_id)
        if flipped and run is not None:
            taken.append((run_id, phase, next_pending(session, run)))
    return taken


def wake(session: Session, run_id: str) -> list[tuple[str, str, list[str]]]:
    """Take the run's waiting step now, due or not: ``[(run_id, phase, tasks)]`` or ``[]``.

    For a person's command (resume, promote, abort) that must not wait for the tick. The
    guarded flip makes a wake racing the tick dispatch the step once.
    """
    run = session.get(WorkflowRun, run_id)
    if run is None or run.status not in PHASE_STATUS.values():
        return []
    flipped = _rowcount(
        session,
        update(StepRun)
        .where(
            StepRun.run_id == run_id,
            StepRun.phase == run.phase,
            StepRun.status == StepStatus.WAITING,
        )
        .values(status=StepStatus.PENDING, due_at=None)
        .execution_options(synchronize_session=False),
    )
    return [(run_id, run.phase, next_pending(session, run))] if flipped else []


def stalled_runs(
    session: Session, *, grace: float, idle_grace: float | None = None, limit: int = 200
) -> list[tuple[str, str, list[str]]]:
    """Take runs whose deadline passed with no progress: ``(run_id, phase, tasks)`` each.

    A step still held, or under a future wait, is left alone; the others get their
    deadline pushed out (guarded, so two beats take a run once) and are returned for
    re-dispatch from their first unfinished step. ``idle_grace`` (given while no
    backlog can explain a wait) also takes a run whose next step nobody has started
    for that long since its last progress, before its deadline.
    """
    now = utcnow()
    overdue = WorkflowRun.deadline_at < now
    if idle_grace is not None:
        overdue = or_(overdue, WorkflowRun.updated_at < now - dt.timedelta(seconds=idle_grace))
    runs = session.scalars(
        select(WorkflowRun)
        .where(WorkflowRun.status.in_(PHASE_STATUS.values()), overdue)
        .order_by(WorkflowRun.deadline_at)
        .limit(limit)
    ).all()
    taken: list[tuple[str, str, list[str]]] = []
    for run in runs:
        tasks = _retake(session, run, grace=grace, now=now)
        if tasks is not None:
            taken.append((run.id, run.phase, tasks))
    return taken


def _retake(
    session: Session, run: WorkflowRun, *, grace: float, now: dt.datetime
) -> list[str] | None:
    """Push a stalled run's deadline out; its tasks to re-send, or ``None`` to leave it be."""
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
        return None
    early = run.deadline_at is not None and run.deadline_at >= now
    if early and current.status != StepStatus.PENDING:
        return None  # taken for being idle: only an untouched step can have lost its message
    busy_until = None
    if current.status in (StepStatus.RUNNING, StepStatus.RETRYING):
        # Held, or parked for a countdown: abandoned_steps frees it once its owner is
        # silent or its countdown message is overdue; until then it is busy.
        busy_until = now
    elif current.status == StepStatus.WAITING and current.due_at and current.due_at > now:
        busy_until = current.due_at
    new_deadline = (busy_until or now) + dt.timedelta(seconds=grace)
    moved = _rowcount(
        session,
        update(WorkflowRun)
        .where(
            WorkflowRun.id == run.id,
            WorkflowRun.deadline_at == run.deadline_at,
            WorkflowRun.updated_at == run.updated_at,
        )
        .values(deadline_at=new_deadline, updated_at=now)
        .execution_options(synchronize_session=False),
    )
    if not moved or busy_until is not None:
        return None
    if current.status == StepStatus.WAITING:
        current.status, current.due_at = StepStatus.PENDING, None
    log.warning("workflow_stalled", workflow_id=run.id, step=current.name)
    return next_pending(session, run)
