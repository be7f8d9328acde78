"""The beat schedule: data only. Every interval and crontab is a setting; tasks are named,
not imported (loading the schedule imports no task module).

Each entry's ``expires`` is at most its interval: a message that waited past its slot is
dropped rather than run in the next one. The runs themselves claim their schedule slot
(``workers.runtime.schedule.claim_slot``), so a second beat, or a re-run, does nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery.schedules import crontab

if TYPE_CHECKING:
    from workers.runtime.settings import Settings

__all__ = ["build_beat_schedule"]

#: Seconds in a day: the expiry of daily runs.
DAY = 24 * 3600


def _every(task: str, seconds: float, queue: str, **extra: Any) -> dict[str, Any]:
    return {
        "task": task,
        "schedule": seconds,
        "options": {"expires": seconds, "queue": queue},
        **extra,
    }


def _billing_close(settings: Settings) -> dict[str, Any]:
    if settings.billing_period in ("month", "day"):
        schedule: Any = crontab(
            hour=settings.billing_close_hour, minute=settings.billing_close_minute
        )
        return {
            "task": "cul8er.billing.close_periods",
            "schedule": schedule,
            "options": {"expires": DAY, "queue": "metering"},
        }
    return _every("cul8er.billing.close_periods", settings.billing_close_interval, "metering")


def build_beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Entry name → task name, schedule and options, for ``settings``."""
    return {
        # Dispatch steps whose wait or retry is due (waits live in the ledger, not the broker).
        "workflows-tick": _every("cul8er.workflows.tick", settings.tick_interval, "lifecycle"),
        # Refuse production deployments whose approval window passed (audited).
        "deployments-expire": _every(
            "cul8er.deployments.expire_approvals", settings.tick_interval * 5, "lifecycle"
        ),
        # Resume runs that stopped making progress: lost message, killed worker.
        "workflows-reconcile": _every(
            "cul8er.workflows.reconcile", settings.reconcile_interval, "lifecycle"
        ),
        # Recreate missing instances, report (and with drift_prune, destroy) orphans.
        "platforms-reconcile": _every(
            "cul8er.platforms.reconcile",
            settings.drift_interval,
            "lifecycle",
            kwargs={"prune": settings.drift_prune},
        ),
        # Read every active tenant's counters into one usage row per metric and window.
        "metering": _every("cul8er.metering.meter_all", settings.meter_interval, "metering"),
        # Apply each plan's quota policy (suspend, throttle, bill overage) to the usage so far.
        "quotas": _every("cul8er.quotas.enforce", settings.meter_interval, "metering"),
        # Evaluate autoscale rules against the last windows of usage.
        "autoscale": _every("cul8er.autoscale.evaluate", settings.autoscale_interval, "metering"),
        # Probe every active tenant's instances.
        "health-sweep": _every("cul8er.health.sweep", settings.health_sweep_interval, "health"),
        # Close the billing periods that ended into invoices (daily, or per short period).
        "billing-close": _billing_close(settings),
        # Remove old idempotency and slot keys, and expired task results.
        "cleanup": {
            "task": "cul8er.maintenance.cleanup",
            "schedule": crontab(hour=settings.cleanup_hour, minute=30),
            "options": {"expires": DAY, "queue": "lifecycle"},
        },
    }
