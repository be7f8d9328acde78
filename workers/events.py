"""The event bus: what happens in the app, delivered to every active observer plugin.

``emit`` sends one ``cul8er.events.deliver`` message per event (nothing when no observer
is active); that task calls each observer in turn, so a failing observer is logged and
retried on its own while the others carry on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from kombu.exceptions import KombuError

from schemas.events import Event
from schemas.manifest import PluginType

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
    from workers import plugin_tasks

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
) -> Event | None:
    """Publish an event to the observers; the event, or ``None`` when nobody listens.

    Never raises: losing an observation must not fail the work it observes.
    """
    try:
        if not active_observers(refresh=False):
            return None
        event = Event(
            event_type=event_type,
            tenant_id=tenant_id,
            workflow_id=workflow_id,
            subject=subject,
            data=data or {},
        )
        from workers.app import app

        app.send_task(DELIVER_TASK, kwargs={"event": event.model_dump(mode="json")})
        return event
    except (KombuError, OSError) as exc:
        log.warning("event_not_published", event_type=event_type, error=str(exc))
        return None
