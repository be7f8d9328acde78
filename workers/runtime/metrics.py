"""Prometheus metrics shared by every process of a worker (prefork children included).

prometheus_client keeps each process's values in mmap files of one folder when the
``PROMETHEUS_MULTIPROC_DIR`` variable names it, and an exporter sums the files of every
process (``MultiProcessCollector``). The catch: ``prometheus_client.values`` picks its
value class (in-memory or mmap) once, when it is first imported. :func:`configure` sets the
variable *and* swaps ``prometheus_client.values.ValueClass`` for a fresh mmap-backed class,
which works whenever it runs, because metrics look the class up each time they create a
value (``values.ValueClass(...)`` in ``prometheus_client.metrics``).

How a worker uses this module:

* the worker's main process calls :func:`configure` before it forks its pool (Celery
  ``worker_init``), and may :func:`serve` ``/metrics`` (``prometheus_port``);
* children inherit that; the prometheus observer calls :func:`configure` again itself, which
  is a no-op for the same folder;
* a child that exits calls :func:`mark_process_dead` (Celery ``worker_process_shutdown``);
* metric objects come from :func:`counter`, :func:`gauge` and :func:`histogram`: created once
  per process and folder, never registered in the global registry (the files are the truth).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TypeVar

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.metrics import MetricWrapperBase

if TYPE_CHECKING:
    from collections.abc import Sequence
    from wsgiref.simple_server import WSGIServer

    from workers.runtime.settings import Settings

__all__ = [
    "ENV_VAR",
    "GaugeMode",
    "clear",
    "configure",
    "configured_directory",
    "counter",
    "exporter_registry",
    "gauge",
    "histogram",
    "mark_process_dead",
    "metrics_directory",
    "render",
    "serve",
]

log = structlog.get_logger(__name__)

#: The variable prometheus_client reads to find the multi-process folder.
ENV_VAR: Final = "PROMETHEUS_MULTIPROC_DIR"

#: How the values of one gauge in several processes are merged into one sample.
GaugeMode = Literal[
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent",
    "livemostrecent",
]  # fmt: skip

_M = TypeVar("_M", bound=MetricWrapperBase)

_lock = threading.RLock()
#: The folder this process writes to, once configured.
_directory: Path | None = None
#: Metric objects of this process, by name; emptied when the folder changes.
_metrics: dict[str, MetricWrapperBase] = {}


def metrics_directory(settings: Settings) -> Path:
    """The multi-process folder of ``settings``: ``prometheus_dir``, else under ``data_dir``."""
    return (settings.prometheus_dir or settings.data_dir / "prometheus").expanduser().resolve()


def configure(directory: Path) -> None:
    """Make this process write metric values to mmap files in ``directory`` (created).

    Idempotent for the same folder. Call it before the first metric of this process is
    created; metrics created earlier by other code keep their in-memory values.
    """
    global _directory
    directory = directory.expanduser().resolve()
    with _lock:
        if _directory == directory and _multiprocess_values():
            return
        directory.mkdir(parents=True, exist_ok=True)
        inherited = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = str(directory)
        if not (
            _directory is None
            and _multiprocess_values()
            and inherited is not None
            and Path(inherited).expanduser().resolve() == directory
        ):
            # A fresh class: the mmap class caches its open files by metric type only, so
            # one made for another folder (or none) would keep writing where it was.
            values.ValueClass = values.MultiProcessValue()
        _directory = directory
        # Metric objects hold their value objects: made before, they write elsewhere.
        _metrics.clear()
    log.info("prometheus_multiprocess_configured", directory=str(directory))


def configured_directory() -> Path | None:
    """The folder :func:`configure` set in this process, or ``None``."""
    return _directory


def clear(directory: Path) -> None:
    """Remove every metric file of ``directory``: once, before any worker process starts.

    prometheus_client wants the folder emptied between runs, or files of long-dead
    processes pile up (counters keep their totals either way until the files go).
    """
    for path in Path(directory).glob("*.db"):
        path.unlink(missing_ok=True)
    log.info("prometheus_multiprocess_cleared", directory=str(directory))


def exporter_registry(directory: Path) -> CollectorRegistry:
    """A registry holding only the sum of every process's files in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return registry


def render(directory: Path) -> bytes:
    """The text exposition of the metrics of every process that wrote to ``directory``."""
    return generate_latest(exporter_registry(directory))


def serve(port: int, directory: Path, *, addr: str = "127.0.0.1") -> WSGIServer:
    """Serve ``/metrics`` of ``directory`` on ``addr:port`` from a daemon thread.

    Port 0 picks a free port (``server.server_port``); stop with ``server.shutdown()``.
    """
    server, _thread = start_http_server(port, addr=addr, registry=exporter_registry(directory))
    log.info("prometheus_exporter_started", addr=addr, port=server.server_port)
    return server


def mark_process_dead(pid: int, directory: Path) -> None:
    """Drop the ``live*`` gauges of the exited process ``pid``; its counters stay summed."""
    multiprocess.mark_process_dead(pid, str(directory))


def counter(name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
    """This process's counter ``name``, created on first use."""
    with _lock:
        metric = _metrics.get(name)
        if metric is None:
            metric = _metrics[name] = Counter(name, documentation, labelnames, registry=None)
        return _checked(metric, Counter, labelnames)


def gauge(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    *,
    multiprocess_mode: GaugeMode = "mostrecent",
) -> Gauge:
    """This process's gauge ``name``, created on first use; ``multiprocess_mode`` merges them."""
    with _lock:
        metric = _metrics.get(name)
        if metric is None:
            metric = _metrics[name] = Gauge(
                name, documentation, labelnames, registry=None, multiprocess_mode=multiprocess_mode
            )
        return _checked(metric, Gauge, labelnames)


def histogram(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    *,
    buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
) -> Histogram:
    """This process's histogram ``name``, created on first use."""
    with _lock:
        metric = _metrics.get(name)
        if metric is None:
            metric = _metrics[name] = Histogram(
                name, documentation, labelnames, registry=None, buckets=buckets
            )
        return _checked(metric, Histogram, labelnames)


def _checked(metric: MetricWrapperBase, kind: type[_M], labelnames: Sequence[str]) -> _M:
    # Two callers asking one name for different things is a bug, not a new series.
    if not isinstance(metric, kind) or tuple(metric._labelnames) != tuple(labelnames):
        raise ValueError(f"metric {metric._name!r} already exists with another type or labels")
    return metric


def _multiprocess_values() -> bool:
    return bool(getattr(values.ValueClass, "_multiprocess", False))
