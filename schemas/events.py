"""Events the app emits and observer plugins receive (docs/architecture.md §5, observers)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

__all__ = ["EVENT_TYPES", "Event", "EventType"]

EventType = Literal[
    "workflow.started",
    "workflow.succeeded",
    "workflow.failed",
    "step.started",
    "step.succeeded",
    "step.failed",
    "step.taken_over",
    "tenant.status_changed",
    "plugin.state_changed",
    "invoice.finalized",
    "quota.exceeded",
    "autoscale.decided",
    "worker.lost",
    "deployment.created",
    "deployment.approved",
    "deployment.started",
    "deployment.stage_changed",
    "deployment.paused",
    "deployment.resumed",
    "deployment.promoted",
    "deployment.aborted",
    "deployment.rolled_back",
    "deployment.failed",
]

#: Every event type, in the order above.
EVENT_TYPES: tuple[str, ...] = get_args(EventType)


class Event(BaseModel):
    """The envelope every event travels in; ``data`` holds the type's own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    event_type: EventType
    schema_version: int = 1
    occurred_at: AwareDatetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))
    tenant_id: str | None = None
    workflow_id: str | None = None
    #: What the event is about: a step's task name, a plugin's name.
    subject: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
