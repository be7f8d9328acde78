"""A deployment's row as its stages read and write it, and what a stage answers.

Shared by the release stages (``stages.py``) and the plugin stages (``plugin_stages.py``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.engine.events import emit
from workers.runtime.db import session_scope
from workers.runtime.errors import PermanentError, ValidationFailedError
from workers.runtime.models import AuditEvent, Deployment, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from schemas.events import EventType
    from schemas.plugins import Stage
    from schemas.tasks import CreateDeployment, DeploymentAction

__all__ = [
    "Aborted",
    "Done",
    "GateFailed",
    "HOLD",
    "Hold",
    "INLINE_WAIT",
    "Planned",
    "Result",
    "WORKFLOW",
    "Wait",
    "add_timeline",
    "audit",
    "consume",
    "event",
    "field_error",
    "now",
    "read",
    "summary",
    "ts",
    "write",
]


#: The ledger workflow that carries a deployment (declared in ``tasks/workflows.py``).
WORKFLOW = "deployment"
#: Waits up to this long are slept inside the step (seconds); longer ones park in the ledger.
INLINE_WAIT = 2.0
#: How long a step held for a person parks; their command wakes it sooner.
HOLD = 3600.0


class Aborted(PermanentError):
    """A person aborted the deployment: it rolls back."""

    code = "aborted"


class GateFailed(PermanentError):
    """An analysis gate failed: traffic is back on stable, the deployment rolls back."""

    code = "gate_failed"

    def __init__(self, message: str, *, measurement: dict[str, Any]) -> None:
        super().__init__(message)
        self.measurement = measurement

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "measurement": self.measurement}


@dataclass(frozen=True)
class Done:
    note: dict[str, Any]


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Hold:
    reason: str


Result = Done | Wait | Hold


def now() -> dt.datetime:
    return utcnow()


def ts(moment: dt.datetime) -> float:
    return moment.timestamp()


# -- the deployment row -----------------------------------------------------------------------


def read(deployment_id: str) -> Deployment:
    with session_scope() as session:
        row = session.get(Deployment, deployment_id)
        if row is None:
            raise PermanentError(f"deployment {deployment_id!r} does not exist")
        session.expunge(row)
        return row


def write(deployment_id: str, *, timeline: dict[str, Any] | None = None, **changes: Any) -> None:
    """Change the deployment's columns; ``timeline`` appends one entry (with its time)."""
    with session_scope() as session:
        row = session.get(Deployment, deployment_id, with_for_update=True)
        if row is None:
            return
        for key, value in changes.items():
            setattr(row, key, value)
        if timeline is not None:
            row.timeline = [*row.timeline, {"at": now().isoformat(), **timeline}]


def consume(deployment_id: str, key: str) -> dict[str, Any] | None:
    """Take a person's request ``key`` off the deployment: what it said, or ``None``."""
    with session_scope() as session:
        row = session.get(Deployment, deployment_id, with_for_update=True)
        if row is None or key not in row.requests:
            return None
        taken = dict(row.requests[key])
        row.requests = {k: v for k, v in row.requests.items() if k != key}
        return taken


def event(row: Deployment, event_type: EventType, **data: Any) -> None:
    emit(
        event_type,
        tenant_id=row.tenant_id,
        workflow_id=row.workflow_id,
        subject=row.id,
        data={"deployment_id": row.id, "version": row.release.get("version"), **data},
    )


# -- what commands share --------------------------------------------------------------------


def field_error(field: str, message: str) -> ValidationFailedError:
    return ValidationFailedError(message, errors=[{"field": field, "message": message}])


def audit(session: Session, row: Deployment, kind: str, actor: str, **data: Any) -> None:
    session.add(
        AuditEvent(
            tenant_id=row.tenant_id,
            kind=f"deployment.{kind}",
            data={"deployment_id": row.id, "actor": actor, **data},
        )
    )


def add_timeline(row: Deployment, event: str, **data: Any) -> None:
    row.timeline = [*row.timeline, {"at": utcnow().isoformat(), "event": event, **data}]


def summary(row: Deployment) -> dict[str, Any]:
    """The short form of a deployment (what commands answer)."""
    return {
        "deployment_id": row.id,
        "tenant_id": row.tenant_id,
        "plugin": row.plugin,
        "targets": len(row.targets) if row.plugin else None,
        "status": row.status,
        "strategy": row.strategy,
        "version": row.release.get("version"),
        "previous_version": row.previous_release.get("version"),
        "environment": row.environment,
        "stage_index": row.stage_index,
        "stages": len(row.stages),
        "workflow_id": row.workflow_id,
    }


@dataclass(frozen=True)
class Planned:
    """A deployment planned by its strategy before the transaction that records it."""

    payload: CreateDeployment
    deployment_id: str
    strategy: str
    stages: list[Stage]
    rollback_of: str | None = None
    #: The action that asked for it (a fast rollback's actor and reason).
    action: DeploymentAction | None = None
    #: A plugin deployment's tenants, in the order they move, and the version they leave.
    targets: tuple[str, ...] = ()
    previous_version: str | None = None
    environment: str | None = None
