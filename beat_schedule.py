"""The beat schedule: data only. Every interval is a setting; tasks are named, not imported."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.settings import Settings

__all__ = ["build_beat_schedule"]


def build_beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Entry name → task name, interval and options, for ``settings``."""
    return {
        # Dispatch steps whose wait or retry is due (waits live in the ledger, not the broker).
        "workflows-tick": {
            "task": "cul8er.workflows.tick",
            "schedule": settings.tick_interval,
            "options": {"expires": settings.tick_interval * 2, "queue": "lifecycle"},
        },
        # Resume runs that stopped making progress: lost message, killed worker.
        "workflows-reconcile": {
            "task": "cul8er.workflows.reconcile",
            "schedule": settings.reconcile_interval,
            "options": {"expires": settings.reconcile_interval * 2, "queue": "lifecycle"},
        },
        # Recreate missing instances, report (and with drift_prune, destroy) orphans.
        "platforms-reconcile": {
            "task": "cul8er.platforms.reconcile",
            "schedule": settings.drift_interval,
            "kwargs": {"prune": settings.drift_prune},
            "options": {"expires": settings.drift_interval, "queue": "lifecycle"},
        },
    }
