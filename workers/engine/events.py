"""The engine's event hook: what happens in the app, handed to whoever subscribed.

The engine (the ledger, steps, takeover) and the rooms above it call :func:`emit`; it builds
one :class:`~schemas.events.Event` and hands it to every subscribed :class:`Listener`. The
engine knows nothing of who listens: the plugin host subscribes its observer bus
(:mod:`workers.pluginhost.bus`) when the app is bootstrapped (:mod:`workers.app`). With
nobody listening, ``emit`` returns ``None`` without building anything.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from schemas.events import Event

if TYPE_CHECKING:
    from schemas.events import EventType

__all__ = ["Listener", "emit", "listeners", "subscribe", "unsubscribe"]

log = structlog.get_logger(__name__)


class Listener(Protocol):
    """Something that receives events: the observer bus, a test's recorder."""

    def listening(self) -> bool:
        """Whether an event emitted now would go anywhere (cheap: no I/O)."""

    def publish(self, event: Event) -> None:
        """Take the event; never block the emitter for long."""


_listeners: list[Listener] = []


def subscribe(listener: Listener) -> None:
    """Hand every later event to ``listener`` (once, however often it subscribes)."""
    if listener not in _listeners:
        _listeners.append(listener)


def unsubscribe(listener: Listener) -> None:
    """Stop handing events to ``listener``."""
    if listener in _listeners:
        _listeners.remove(listener)


def listeners() -> tuple[Listener, ...]:
    """The subscribed listeners, in subscription order."""
    return tuple(_listeners)


def emit(
    event_type: EventType,
    *,
    tenant_id: str | None = None,
    workflow_id: str | None = None,
    subject: str | None = None,
    data: dict[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    occurred_at: dt.datetime | None = None,
) -> Event | None:
    """Publish an event to the listeners; the event, or ``None`` when nobody listens.

    Never raises: losing an observation must not fail the work it observes.
    """
    active = [listener for listener in _listeners if listener.listening()]
    if not active:
        return None
    event = Event(
        # A caller with a natural identity (an invoice) passes a deterministic id: a repeated
        # emission then carries the same Idempotency-Key to webhooks.
        event_id=event_id or uuid.uuid4(),
        event_type=event_type,
        # With a deterministic id, the moment too: a repeated emission is the same event.
        occurred_at=occurred_at or dt.datetime.now(dt.UTC),
        tenant_id=tenant_id,
        workflow_id=workflow_id,
        subject=subject,
        data=data or {},
    )
    for listener in active:
        try:
            listener.publish(event)
        except Exception as exc:
            log.warning("event_not_published", event_type=event_type, error=str(exc))
    return event
