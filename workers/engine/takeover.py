"""Who may take a running step over, and freeing the steps of owners that died.

A step's owner renews it with its heartbeat (:mod:`workers.runtime.liveness`). A delivery
that finds a step running asks :func:`verdict` whether the owner still holds it:
renewed within ``owner_timeout`` and inside its lease means busy; an owner that
went silent, exited on this very host, or outlived its lease (alive but hung)
means the step may be taken over, with a record for the step's history. The
reconcile beat does the same without a delivery: :func:`abandoned_steps` frees
such steps for re-dispatch, :func:`lost_workers` notes the processes that died.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast, overload

import structlog
from sqlalchemy import select, update

from schemas.states import PHASE_STATUS, StepStatus
from workers.engine.events import emit
from workers.runtime.liveness import exited
from workers.runtime.models import StepRun, WorkerProcess, WorkflowRun, utcnow

if TYPE_CHECKING:
    from sqlalchemy import CursorResult, Select, Table
    from sqlalchemy.orm import Session

__all__ = [
    "Abandoned",
    "OWNER_COLUMNS",
    "Owner",
    "abandoned_steps",
    "announce",
    "lost_workers",
    "verdict",
]

log = structlog.get_logger(__name__)

_steps = cast("Table", StepRun.__table__)
_runs = cast("Table", WorkflowRun.__table__)
_workers = cast("Table", WorkerProcess.__table__)

#: What :func:`verdict` needs of a step's owner, from ``workers`` joined on ``owner_id``.
OWNER_COLUMNS = (
    _workers.c.node.label("owner_node"),
    _workers.c.pid.label("owner_pid"),
    _workers.c.namespace.label("owner_namespace"),
    _workers.c.started_at.label("owner_started"),
)


@dataclass(frozen=True)
class Owner:
    """The process claiming a step, and how long a silent owner is trusted."""

    #: The claiming process's boot id.
    boot_id: str
    #: Seconds without a renewal after which a running step's owner counts as dead.
    timeout: float
    #: Steps this very process is running now (it may re-claim its own other steps).
    holding: frozenset[int] = frozenset()
    #: The claimer's pid namespace: an owner in the same one is checked for having exited.
    namespace: str | None = None


@overload
def _aware(value: dt.datetime) -> dt.datetime: ...
@overload
def _aware(value: None) -> None: ...
def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # Core rows skip the ORM's type round trip on some backends: pin naive values to UTC.
    return value.replace(tzinfo=dt.UTC) if value is not None and value.tzinfo is None else value


def _seconds_since(now: dt.datetime, then: dt.datetime | None) -> float | None:
    return round((now - _aware(then)).total_seconds(), 3) if then is not None else None


def verdict(row: Any, *, now: dt.datetime, owner: Owner) -> tuple[str, dict[str, Any] | None]:
    """Whether a delivery may claim an unfinished step: ``claim``, ``take`` or ``busy``.

    ``take`` comes with the takeover record for the step's history: whose claim
    is taken, why, and how long its owner had been silent.
    """
    if row.status == StepStatus.PENDING or row.status == StepStatus.RETRYING:
        return "claim", None
    if row.status == StepStatus.WAITING:
        due = _aware(row.due_at)
        return ("busy", None) if due is not None and due > now else ("claim", None)
    lease = _aware(row.lease_until)
    beat = _aware(row.heartbeat_at)
    if row.owner_id is None:
        # A claim from before owners existed: only its lease can free it.
        reason = None if lease is not None and lease > now else "lease_expired"
    elif row.owner_id == owner.boot_id:
        # Our own earlier attempt, which ended without recording an outcome (its
        # database write failed): take it back at once, unless it runs right now.
        reason = None if row.id in owner.holding else "abandoned"
    elif _exited(row, owner):
        # Its process is gone (a pool child killed, its worker SIGKILLed) and we can see
        # it from here: no need to wait for its heartbeats to go stale.
        reason = "owner_exited"
    elif lease is not None and lease <= now:
        reason = "lease_expired"  # alive but hung past the step's time limit
    elif beat is None or (now - beat).total_seconds() > owner.timeout:
        reason = "owner_silent"
    else:
        reason = None
    if reason is None:
        return "busy", None
    previous = {"boot_id": row.owner_id, "node": row.owner_node, "pid": row.owner_pid}
    return "take", _record(now, reason, row.attempts, previous, since=beat)


def _record(
    now: dt.datetime,
    reason: str,
    attempt: int,
    previous: dict[str, Any] | None,
    *,
    since: dt.datetime | None,
) -> dict[str, Any]:
    """A takeover, as the step's history keeps it (``by`` is added by whoever takes)."""
    return {
        "event": "takeover",
        "at": now.isoformat(),
        "reason": reason,
        "attempt": attempt,
        "previous_owner": previous,
        "silent_for": _seconds_since(now, since),
    }


def announce(
    takeover: dict[str, Any], *, tenant_id: str | None, workflow_id: str, step: str, phase: str
) -> None:
    """A takeover's log line and ``step.taken_over`` event."""
    previous = takeover.get("previous_owner") or {}
    log.warning(
        "step_taken_over",
        workflow_id=workflow_id,
        step=step,
        reason=takeover["reason"],
        by=takeover.get("by"),
        previous_node=previous.get("node"),
        previous_pid=previous.get("pid"),
        silent_for=takeover.get("silent_for"),
    )
    emit(
        "step.taken_over",
        tenant_id=tenant_id,
        workflow_id=workflow_id,
        subject=step,
        data={"phase": phase, "takeover": takeover},
    )


def _exited(row: Any, owner: Owner) -> bool:
    if owner.namespace is None or row.owner_namespace != owner.namespace:
        return False
    if row.owner_pid is None or row.owner_started is None:
        return False
    return exited(int(row.owner_pid), _aware(row.owner_started))


@dataclass(frozen=True)
class Abandoned:
    """A step freed from a dead owner (or an overdue countdown), to re-dispatch from."""

    run_id: str
    phase: str
    step: str
    tenant_id: str | None
    #: The message id the step is handed to (the first of the new chain).
    task_id: str
    #: The takeover, as recorded in the step's history.
    takeover: dict[str, Any]


def abandoned_steps(
    session: Session,
    *,
    owner_timeout: float,
    grace: float,
    namespace: str | None = None,
    limit: int = 200,
) -> list[Abandoned]:
    """Free the current steps whose owner stopped renewing them; returns what to re-dispatch.

    Found without waiting for any grace: a running step silent for ``owner_timeout``
    (its owner died or froze), one whose owner in ``namespace`` (this host) has
    exited, a running step past its lease (alive but hung), and
    a retrying step whose countdown message is overdue (it died with its worker).
    Each is put back to ``pending``, handed to a fresh message id, with the takeover
    in its history; the guard on ``attempts`` makes two reconcilers free it once.
    """
    now = utcnow()
    rows = session.execute(
        _candidates(now=now, owner_timeout=owner_timeout, namespace=namespace).limit(limit)
    ).all()
    # Nobody can be holding these: any owner id but a real one reads as "someone else".
    nobody = Owner(boot_id="", timeout=owner_timeout, namespace=namespace)
    freed: list[Abandoned] = []
    for row in rows:
        takeover: dict[str, Any] | None
        if row.status == StepStatus.RETRYING:
            takeover = _record(now, "countdown_lost", row.attempts, None, since=row.due_at)
        else:
            decision, takeover = verdict(row, now=now, owner=nobody)
            if decision != "take" or takeover is None:
                continue
        found = _release(session, row, {**takeover, "by": "reconcile"}, now=now, grace=grace)
        if found is not None:
            freed.append(found)
    return freed


def _candidates(*, now: dt.datetime, owner_timeout: float, namespace: str | None) -> Select[Any]:
    """Current steps that may be abandoned, with their owner's columns (one query)."""
    silent = now - dt.timedelta(seconds=owner_timeout)
    return (
        select(
            _steps.c.id,
            _steps.c.run_id,
            _steps.c.phase,
            _steps.c.name,
            _steps.c.status,
            _steps.c.attempts,
            _steps.c.owner_id,
            _steps.c.heartbeat_at,
            _steps.c.lease_until,
            _steps.c.due_at,
            _steps.c.history,
            *OWNER_COLUMNS,
            _runs.c.tenant_id,
        )
        .join(_runs, (_runs.c.id == _steps.c.run_id) & (_runs.c.phase == _steps.c.phase))
        .outerjoin(_workers, _workers.c.boot_id == _steps.c.owner_id)
        .where(
            _runs.c.status.in_(PHASE_STATUS.values()),
            (
                (_steps.c.status == StepStatus.RUNNING)
                & (
                    (_steps.c.heartbeat_at < silent)
                    | (_steps.c.lease_until < now)
                    | (_steps.c.heartbeat_at.is_(None) & (_steps.c.started_at < silent))
                    # Owners on this host are checked for having exited, at once.
                    | (_workers.c.namespace == namespace)
                )
            )
            | ((_steps.c.status == StepStatus.RETRYING) & (_steps.c.lease_until < now)),
        )
    )


def _release(
    session: Session, row: Any, takeover: dict[str, Any], *, now: dt.datetime, grace: float
) -> Abandoned | None:
    """Put ``row`` back to pending under a fresh message id, unless another reconciler did."""
    task_id = uuid.uuid4().hex
    released = session.connection().execute(
        update(_steps)
        .where(
            _steps.c.id == row.id,
            _steps.c.attempts == row.attempts,
            _steps.c.status == row.status,
        )
        .values(
            status=StepStatus.PENDING,
            owner_id=None,
            heartbeat_at=None,
            lease_until=None,
            task_id=task_id,
            history=[*(row.history or []), takeover],
        )
    )
    if not cast("CursorResult[Any]", released).rowcount:
        return None
    session.execute(
        update(WorkflowRun)
        .where(WorkflowRun.id == row.run_id)
        .values(deadline_at=now + dt.timedelta(seconds=grace), updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return Abandoned(
        run_id=row.run_id,
        phase=row.phase,
        step=row.name,
        tenant_id=row.tenant_id,
        task_id=task_id,
        takeover=takeover,
    )


def lost_workers(session: Session, *, owner_timeout: float) -> list[dict[str, Any]]:
    """Mark the processes that stopped beating as lost, once each; returns them.

    Each comes with the steps it still held, for the log line and the event.
    """
    now = utcnow()
    silent = now - dt.timedelta(seconds=owner_timeout)
    lost = session.execute(
        update(_workers)
        .where(
            _workers.c.beat_at < silent,
            _workers.c.lost_at.is_(None),
            _workers.c.stopped_at.is_(None),
        )
        .values(lost_at=now)
        .returning(_workers.c.boot_id, _workers.c.node, _workers.c.pid, _workers.c.beat_at)
    ).all()
    found = []
    for boot_id, node, pid, beat_at in lost:
        held = session.execute(
            select(_steps.c.run_id, _steps.c.name).where(
                _steps.c.owner_id == boot_id, _steps.c.status == StepStatus.RUNNING
            )
        ).all()
        found.append(
            {
                "boot_id": boot_id,
                "node": node,
                "pid": pid,
                "silent_for": _seconds_since(now, beat_at),
                "held": [{"workflow_id": r, "step": n} for r, n in held],
            }
        )
    return found
