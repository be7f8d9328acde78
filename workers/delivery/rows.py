"""A deployment's row as its stages read and write it, and what a stage answers.

Shared by the release stages (``stages.py``) and the plugin stages (``plugin_stages.py``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.engine.events import emit
from workers.runtime.db import session_scope
from workers.runtime.errors import PermanentError
from workers.runtime.models import Deployment, utcnow

if TYPE_CHECKING:
    from schemas.events import EventType

__all__ = [
    "Aborted",
    "Done",
    "GateFailed",
    "HOLD",
    "Hold",
    "INLINE_WAIT",
    "Result",
    "Wait",
    "consume",
    "event",
    "now",
    "read",
    "ts",
    "write",
]


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
