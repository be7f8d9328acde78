"""Plug the plugin host into the app: worker signals, plugin tasks, the observer bus.

Called once by the composition root, :mod:`workers.app`, which every ``celery -A
workers.app`` process and the ``cul8er`` CLI import. Nothing here runs at import.
"""

from __future__ import annotations

from typing import Any, Final

from celery import signals

from workers.engine import events
from workers.pluginhost import calls
from workers.pluginhost.bus import ObserverBus

__all__ = ["BUS", "bootstrap"]

#: The one observer bus of this process.
BUS: Final = ObserverBus()


def bootstrap() -> None:
    """Connect the worker signals and subscribe the observer bus (idempotent).

    Plugin tasks are registered on the app when the registry boots: in a worker just before
    it imports its task modules (``import_modules``), elsewhere on first use.
    """
    calls.connect_worker_signals()
    signals.worker_process_shutdown.connect(_drain_bus, weak=False)
    events.subscribe(BUS)


def _drain_bus(**_: Any) -> None:
    """A pool child about to exit lets the local observers see what it emitted."""
    BUS.drain()
