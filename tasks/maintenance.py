"""Ledger housekeeping on beat (tick, reconcile) and the public workflow status task."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import structlog
from kombu.exceptions import ChannelError
from sqlalchemy import delete, select

from schemas.tasks import WorkflowStatus
from tasks import workflows as _declared  # noqa: F401  (registers the workflow kinds)
from workers.engine import ledger, takeover
from workers.engine.events import emit
from workers.engine.public import Outcome, public_task
from workers.engine.views import describe_run
from workers.runtime import liveness
from workers.runtime.app import app
from workers.runtime.db import session_scope
from workers.runtime.errors import NotFoundError
from workers.runtime.models import (
    MeterReading,
    Operation,
    StepRun,
    Tenant,
    WorkerProcess,
    WorkflowRun,
    utcnow,
)
from workers.runtime.queues import Queue
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session
from schemas.states import StepStatus, TenantStatus

__all__: list[str] = []

log = structlog.get_logger(__name__)


@app.task(name="cul8er.workflows.tick", ignore_result=True)
def tick() -> int:
    """Dispatch every step whose wait or retry is due; returns how many."""
    with session_scope() as session:
        due = ledger.due_waits(session)
    for run_id, phase, tasks in due:
        ledger.dispatch(app, run_id, phase, tasks)
    if due:
        log.info("waits_dispatched", count=len(due))
    return len(due)


@app.task(name="cul8er.workflows.reconcile", ignore_result=True)
def reconcile() -> int:
    """Resume what stopped: steps whose owner died, then runs whose message was lost.

    A step whose owner stopped renewing it is freed after ``owner_timeout``, with
    no grace to wait out; a run with no owner at all (a lost message) is resumed
    once ``reconcile_grace`` passed without progress. Returns how many resumed.
    """
    settings = get_settings()
    with session_scope() as session:
        lost = takeover.lost_workers(session, owner_timeout=settings.owner_timeout)
        freed = takeover.abandoned_steps(
            session,
            owner_timeout=settings.owner_timeout,
            grace=settings.reconcile_grace,
            namespace=liveness.namespace() if settings.owner_exit_check else None,
        )
        resend = [(step, ledger.pending_tasks(session, step.run_id, step.phase)) for step in freed]
        stalled = ledger.stalled_runs(
            session,
            grace=settings.reconcile_grace,
            idle_grace=settings.lost_message_grace if _queue_empty(Queue.LIFECYCLE) else None,
        )
    for worker in lost:
        log.warning("worker_lost", **worker)
        emit("worker.lost", subject=worker["node"], data=worker)
    for step, tasks in resend:
        takeover.announce(
            step.takeover,
            tenant_id=step.tenant_id,
            workflow_id=step.run_id,
            step=step.step,
            phase=step.phase,
        )
        ledger.dispatch(app, step.run_id, step.phase, tasks, first_task_id=step.task_id)
    for run_id, phase, tasks in stalled:
        ledger.dispatch(app, run_id, phase, tasks)
    if stalled:
        log.warning("workflows_resumed", count=len(stalled))
    return len(freed) + len(stalled)


def _queue_empty(queue: str) -> bool:
    """Whether no message waits in ``queue`` (False when the broker cannot tell)."""
    try:
        with app.connection_for_read() as conn:
            channel: Any = conn.default_channel
            declared = channel.queue_declare(queue=queue, passive=True)
    except ChannelError:
        return True  # Redis keeps no empty list: a queue never declared or drained is empty
    except Exception as exc:
        log.warning("queue_depth_unknown", queue=queue, error=str(exc))
        return False
    return int(declared.message_count) == 0


@public_task("cul8er.workflows.status", WorkflowStatus, idempotent=False)
def status(session: Session, payload: WorkflowStatus) -> Outcome:
    """A workflow's status, steps and error."""
    run = session.get(WorkflowRun, payload.workflow_id)
    if run is None:
        raise NotFoundError(f"workflow {payload.workflow_id} does not exist")
    return Outcome(data=describe_run(session, run), tenant_id=run.tenant_id)


@app.task(name="cul8er.maintenance.cleanup", ignore_result=True)
def cleanup() -> dict[str, int]:
    """Remove idempotency and schedule-slot keys past their retention, and expired results.

    Idempotent: a second run finds nothing older left to remove.
    """
    settings = get_settings()
    cutoff = utcnow() - dt.timedelta(days=settings.operations_retention_days)
    with session_scope() as session:
        keys = len(
            session.scalars(
                delete(Operation).where(Operation.created_at < cutoff).returning(Operation.key)
            ).all()
        )
        # Counter baselines of tenants that are gone would only ever grow the table.
        gone = select(Tenant.id).where(Tenant.status == TenantStatus.TERMINATED)
        readings = len(
            session.scalars(
                delete(MeterReading)
                .where(MeterReading.tenant_id.in_(gone))
                .returning(MeterReading.tenant_id)
            ).all()
        )
        # Processes gone for a day that hold nothing: `cul8er workers` has no use for them.
        held = select(StepRun.owner_id).where(
            StepRun.status == StepStatus.RUNNING, StepRun.owner_id.is_not(None)
        )
        workers = len(
            session.scalars(
                delete(WorkerProcess)
                .where(
                    WorkerProcess.beat_at < utcnow() - dt.timedelta(days=1),
                    WorkerProcess.boot_id.not_in(held),
                )
                .returning(WorkerProcess.boot_id)
            ).all()
        )
    # Database result backends keep expired results until asked; Redis expires its own.
    app.backend.cleanup()
    removed = {"operations": keys, "meter_readings": readings, "workers": workers}
    log.info("cleanup_done", **removed)
    return removed
