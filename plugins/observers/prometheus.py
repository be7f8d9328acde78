"""The ``prometheus`` observer: events counted into metrics a Prometheus server scrapes.

Every worker process writes its values to mmap files under ``settings.prometheus_dir``
(default ``data_dir/prometheus``, see :mod:`workers.runtime.metrics`); the exporter a worker's
main process serves (``prometheus_port``) or :func:`workers.runtime.metrics.render` sums them.

Series:

* ``cul8er_events_total{event_type}``: every event observed;
* ``cul8er_step_failures_total{step}``: ``step.failed`` events, by step task name;
* ``cul8er_workflow_duration_seconds{kind,status}``: ``workflow.succeeded`` and
  ``workflow.failed`` events whose data has ``kind`` and ``duration_seconds``;
* ``cul8er_tenant_transitions_total{to}``: ``tenant.status_changed`` events, by new status;
* ``cul8er_metric{name,labels}`` (gauge, the most recent value of any process),
  ``cul8er_metric_counter_total{name,labels}`` (counter samples are increments) and
  ``cul8er_metric_histogram{name,labels}``: reported metrics, by ``kind``; ``labels`` is
  the sample's labels as sorted ``key=value`` pairs joined by commas.

A redelivered event or sample is counted once per process (the last few thousand ids are
remembered); a redelivery that lands on another process is counted again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final

import structlog

from schemas.plugins import Ack, HealthStatus

# ``plugin_api.metrics`` (and with it prometheus_client) is imported on its first use, when
# the observer is built, not when the plugin loads.
from workers import plugin_api
from workers.plugin_api import PermanentError

if TYPE_CHECKING:
    from pathlib import Path

    from prometheus_client import Counter, Gauge, Histogram

    from schemas.events import Event
    from schemas.plugins import MetricSample
    from workers.plugin_api import PluginContext

__all__ = ["DURATION_BUCKETS", "PrometheusObserver", "labels_value"]

log = structlog.get_logger(__name__)

#: Buckets of workflow durations (seconds): from a quick resize to a long migration.
DURATION_BUCKETS: Final = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: How many event ids (and sample keys) a process remembers to count a redelivery once.
SEEN_MAX: Final = 4096
#: Label value of a series whose event lacks the field.
UNKNOWN: Final = "unknown"


def _events() -> Counter:
    return plugin_api.metrics.counter("cul8er_events", "Events observed, by type.", ("event_type",))


def _step_failures() -> Counter:
    return plugin_api.metrics.counter(
        "cul8er_step_failures", "Steps that failed, by step.", ("step",)
    )


def _workflow_duration() -> Histogram:
    return plugin_api.metrics.histogram(
        "cul8er_workflow_duration_seconds",
        "Time from a workflow's creation to its end, by kind and final status.",
        ("kind", "status"),
        buckets=DURATION_BUCKETS,
    )


def _tenant_transitions() -> Counter:
    return plugin_api.metrics.counter(
        "cul8er_tenant_transitions", "Tenant status changes, by new status.", ("to",)
    )


def _metric_gauge() -> Gauge:
    # mostrecent: a sample may be reported from any process; the latest one is the value,
    # and it stays after that process exits.
    return plugin_api.metrics.gauge(
        "cul8er_metric",
        "Reported gauge samples: the most recent value.",
        ("name", "labels"),
        multiprocess_mode="mostrecent",
    )


def _metric_counter() -> Counter:
    return plugin_api.metrics.counter(
        "cul8er_metric_counter", "Reported counter samples, summed.", ("name", "labels")
    )


def _metric_histogram() -> Histogram:
    return plugin_api.metrics.histogram(
        "cul8er_metric_histogram", "Reported histogram samples.", ("name", "labels")
    )


def labels_value(labels: dict[str, str]) -> str:
    """A sample's labels as one label value: sorted ``key=value`` pairs joined by commas."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


class _Seen:
    """The last ``size`` keys this process counted, to count a redelivery once."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._keys

    def add(self, key: str) -> None:
        with self._lock:
            self._keys[key] = None
            self._keys.move_to_end(key)
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)


#: Per process, not per instance: a reloaded plugin must not count a redelivery again.
_seen: Final = _Seen(SEEN_MAX)


class PrometheusObserver:
    """Counts events into multi-process Prometheus metrics; reported samples too."""

    def __init__(self, config: None = None, context: PluginContext | None = None) -> None:
        # The plugin has no config model: the folder comes from the settings.
        self.context = context
        settings = context.settings if context is not None else plugin_api.get_settings()
        self.directory: Path = plugin_api.metrics.metrics_directory(settings)
        # Before any metric of this process exists; a no-op when the worker did it already.
        plugin_api.metrics.configure(self.directory)

    def self_test(self) -> None:
        """Refuse the plugin when its metrics folder cannot be written."""
        if not os.access(self.directory, os.W_OK):
            raise PermanentError(f"prometheus metrics folder {self.directory} is not writable")

    # -- contract ---------------------------------------------------------------------------

    def observe_event(self, event: Event) -> Ack:
        """Count the event, and its type's own series; a redelivery is counted once."""
        key = f"event:{event.event_id}"
        if key in _seen:
            return Ack(ok=True, detail="already counted")
        _events().labels(event_type=event.event_type).inc()
        if event.event_type == "step.failed":
            _step_failures().labels(step=event.subject or UNKNOWN).inc()
        elif event.event_type in ("workflow.succeeded", "workflow.failed"):
            self._workflow_finished(event)
        elif event.event_type == "tenant.status_changed":
            _tenant_transitions().labels(to=str(event.data.get("to") or UNKNOWN)).inc()
        _seen.add(key)
        return Ack(ok=True, detail="counted")

    def report_metric(self, metric: MetricSample) -> Ack:
        """Set the gauge, add to the counter, or observe into the histogram of ``metric.kind``."""
        series = {"name": metric.name, "labels": labels_value(metric.labels)}
        if metric.kind == "gauge":
            # Setting a value twice is harmless: no need to remember the sample.
            _metric_gauge().labels(**series).set(metric.value)
            return Ack(ok=True, detail="set")
        key = f"metric:{_sample_key(metric)}"
        if key in _seen:
            return Ack(ok=True, detail="already counted")
        if metric.kind == "counter":
            if metric.value < 0 or math.isnan(metric.value):
                raise PermanentError(
                    f"counter sample {metric.name!r} must not be negative: {metric.value}"
                )
            _metric_counter().labels(**series).inc(metric.value)
        else:
            _metric_histogram().labels(**series).observe(metric.value)
        _seen.add(key)
        return Ack(ok=True, detail="counted")

    def health_status(self) -> HealthStatus:
        """Healthy while this process writes its metrics to a writable folder."""
        if plugin_api.metrics.configured_directory() != self.directory:
            detail = f"this process does not write its metrics to {self.directory}"
            return HealthStatus(healthy=False, detail=detail)
        if not os.access(self.directory, os.W_OK):
            return HealthStatus(healthy=False, detail=f"{self.directory} is not writable")
        return HealthStatus(healthy=True, detail=f"writing to {self.directory}")

    def flush(self) -> Ack:
        """Nothing to do: every change is written to the process's mmap file at once."""
        return Ack(ok=True, detail="nothing buffered")

    # -- events -----------------------------------------------------------------------------

    @staticmethod
    def _workflow_finished(event: Event) -> None:
        duration: Any = event.data.get("duration_seconds")
        # bool is an int: True must not become a one-second workflow.
        if (
            isinstance(duration, bool)
            or not isinstance(duration, int | float)
            or not math.isfinite(duration)
            or duration < 0
        ):
            log.debug("workflow_duration_missing", event_id=str(event.event_id))
            return
        kind = str(event.data.get("kind") or event.subject or UNKNOWN)
        status = str(event.data.get("status") or event.event_type.removeprefix("workflow."))
        _workflow_duration().labels(kind=kind, status=status).observe(float(duration))


def _sample_key(metric: MetricSample) -> str:
    # The same for every delivery of one sample: its name, labels and time.
    identity = [metric.name, sorted(metric.labels.items()), metric.at.isoformat()]
    return hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode()).hexdigest()
