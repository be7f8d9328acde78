"""The observer bus: engine events delivered to every active observer plugin.

Subscribed to the engine's hook (:mod:`workers.engine.events`) by :func:`workers.app`'s
bootstrap. Each event goes right away, in the emitting process, to the cheap local observers
in ``CUL8ER_INLINE_OBSERVERS`` (``log``, ``prometheus``), and as one ``cul8er.events.deliver``
message to the others (a webhook, an untrusted observer); that task calls each in turn, so
a failing observer is logged and retried on its own while the others carry on. Nothing is
sent when no observer is active.

The local observers are called on one daemon thread per process, in the order the events
were emitted, so a step does not wait for its log line and its counters: the thread runs
while the step waits on the database or the broker. :meth:`ObserverBus.drain` waits for
what was handed over (a worker child drains before it exits).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Final

import structlog
from kombu.exceptions import KombuError

from schemas.events import Event
from schemas.manifest import PluginType
from workers.pluginhost import calls
from workers.runtime.app import app
from workers.runtime.settings import get_settings

__all__ = ["DELIVER_TASK", "ObserverBus", "active_observers"]

log = structlog.get_logger(__name__)

#: What the local observers' thread takes: an event for some observers, or a drain's flag.
_Item = tuple[list[str], Event] | threading.Event

#: The task that fans an event out to the observers.
DELIVER_TASK: Final = "cul8er.events.deliver"


def active_observers(*, refresh: bool = True) -> list[str]:
    """The observer plugins that receive events now, sorted.

    ``refresh=False`` answers from this process's last view of the ``plugins`` table:
    events are emitted inside other transactions, where a second connection could wait on
    SQLite's write lock held by the first.
    """
    if not refresh and calls.booted() is None:
        # Not booted here (a script, a unit test): nothing is known to observe, and booting
        # now would read the database inside the caller's transaction.
        return []
    reg = calls.registry()
    if refresh:
        reg.refresh()
    return sorted(
        name
        for name, served in reg.served.items()
        if served.loaded.manifest.type is PluginType.OBSERVER and served.state == "active"
    )


class ObserverBus:
    """The engine's listener that hands events to observer plugins."""

    def __init__(self) -> None:
        self._pid = 0
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def listening(self) -> bool:
        return bool(active_observers(refresh=False))

    def publish(self, event: Event) -> None:
        observers = active_observers(refresh=False)
        inline = set(get_settings().inline_observers)
        here = [name for name in observers if name in inline]
        remote = [name for name in observers if name not in inline]
        if here:
            self._local().put((here, event))
        if not remote:
            return
        try:
            app.send_task(
                DELIVER_TASK, kwargs={"event": event.model_dump(mode="json"), "only": remote}
            )
        except (KombuError, OSError) as exc:
            log.warning("event_not_published", event_type=event.event_type, error=str(exc))

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until the local observers have seen every event handed over so far."""
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            return
        seen = threading.Event()
        self._queue.put(seen)
        seen.wait(timeout)

    def _local(self) -> queue.SimpleQueue[_Item]:
        """This process's queue to the local observers' thread (a forked child starts its own)."""
        if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
            self._pid = os.getpid()
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=_deliver_here, args=(self._queue,), name="cul8er-observers", daemon=True
            )
            self._thread.start()
        return self._queue


def _deliver_here(items: queue.SimpleQueue[_Item]) -> None:
    """The local observers' thread: each event to each of its observers, in order."""
    while True:
        item = items.get()
        if isinstance(item, threading.Event):
            item.set()  # a drain: everything before it has been seen
            continue
        names, event = item
        for name in names:
            _observe_here(name, event)


def _observe_here(name: str, event: Event) -> None:
    """Deliver to a cheap local observer in this process: no message, no database read."""
    try:
        calls.call_served(name, "observe_event", event=event)
    except Exception as exc:
        # An observer never fails the work it observes; it is logged and the others go on.
        log.warning("observer_failed", observer=name, error=f"{type(exc).__name__}: {exc}")
