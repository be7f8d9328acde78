"""The ``log`` observer: every event and metric as one structlog line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from schemas.plugins import Ack, HealthStatus

if TYPE_CHECKING:
    from schemas.events import Event
    from schemas.plugins import MetricSample
    from workers.plugin_api import PluginContext

__all__ = ["LogObserver"]

log = structlog.get_logger(__name__)


class LogObserver:
    """Writes each event as ``event_observed`` and each metric as ``metric_reported``."""

    def __init__(self, config: None = None, context: PluginContext | None = None) -> None:
        # The plugin has no config model: the registry passes None.
        self.context = context
        # Bound to the plugin's name and version when the registry built it.
        self._log: Any = context.log if context is not None else log

    def observe_event(self, event: Event) -> Ack:
        """Log the event; a repeated delivery logs the same ``event_id`` again."""
        self._log.info(
            "event_observed",
            event_type=event.event_type,
            event_id=str(event.event_id),
            occurred_at=event.occurred_at.isoformat(),
            tenant_id=event.tenant_id,
            workflow_id=event.workflow_id,
            subject=event.subject,
            data=event.data,
        )
        return Ack(ok=True, detail="logged")

    def report_metric(self, metric: MetricSample) -> Ack:
        """Log the measurement."""
        self._log.info(
            "metric_reported",
            name=metric.name,
            value=metric.value,
            kind=metric.kind,
            labels=metric.labels,
            at=metric.at.isoformat(),
        )
        return Ack(ok=True, detail="logged")

    def health_status(self) -> HealthStatus:
        """Always healthy: writing a log line cannot wait on anything."""
        return HealthStatus(healthy=True, detail="logging")

    def flush(self) -> Ack:
        """Nothing is buffered here; the log handler flushes itself."""
        return Ack(ok=True, detail="nothing buffered")
