"""The event bus: what happens in the app, delivered to every active observer plugin.

``emit`` hands each event to the cheap local observers in ``CUL8ER_INLINE_OBSERVERS``
(``log``, ``prometheus``) right away, in the emitting process, and sends one
``cul8er.events.deliver`` message for the others (a webhook, an untrusted observer); that
task calls each in turn, so a failing observer is logged and retried on its own while the
others carry on. Nothing is sent when no observer is active.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING, Any

import structlog
from kombu.exceptions import KombuError

from schemas.events import Event
from schemas.manifest import PluginType
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from schemas.events import EventType

__all__ = ["active_observers", "emit"]

log = structlog.get_logger(__name__)

#: The task that fans an event out to the observers.
DELIVER_TASK = "cul8er.events.deliver"


def active_observers(*, refresh: bool = True) -> list[str]:
    """The observer plugins that receive events now, sorted.

    ``refresh=False`` answers from this process's last view of the ``plugins`` table:
    ``emit`` runs inside other transactions, where a second connection could wait on
    SQLite's write lock held by the first.
    """
    from workers.pluginhost import calls as plugin_tasks

    if not refresh and plugin_tasks.booted() is None:
        # Not booted here (a script, a unit test): nothing is known to observe, and booting
        # now would read the database inside the caller's transaction.
        return []
    reg = plugin_tasks.registry()
    if refresh:
        reg.refresh()
    return sorted(
        name
        for name, served in reg.served.items()
        if served.loaded.manifest.type is PluginType.OBSERVER and served.state == "active"
    )


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
    """Publish an event to the observers; the event, or ``None`` when nobody listens.

    Never raises: losing an observation must not fail the work it observes.
    """
    observers = active_observers(refresh=False)
    if not observers:
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
    inline = set(get_settings().inline_observers)
    remote = [name for name in observers if name not in inline]
    for name in observers:
        if name in inline:
            _observe_here(name, event)
    if not remote:
        return event
    try:
        from workers.runtime.app import app

        app.send_task(DELIVER_TASK, kwargs={"event": event.model_dump(mode="json"), "only": remote})
    except (KombuError, OSError) as exc:
        log.warning("event_not_published", event_type=event_type, error=str(exc))
    return event


def _observe_here(name: str, event: Event) -> None:
    """Deliver to a cheap local observer in this process: no message, no database read."""
    from workers.pluginhost.calls import call_served

    try:
        call_served(name, "observe_event", event=event)
    except Exception as exc:
        # An observer never fails the work it observes; it is logged and the others go on.
        log.warning("observer_failed", observer=name, error=f"{type(exc).__name__}: {exc}")
