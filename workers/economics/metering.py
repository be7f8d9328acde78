"""Metering: platform counters become one usage row per tenant, metric and window.

A window is one schedule slot ``[S - interval, S)``. Each source of a tenant (an instance,
its datastore, or its share of a pool) is read once per window; counters (CPU seconds,
requests, bytes) turn into deltas against the last reading kept in ``meter_readings``, gauges
(memory, storage) are aggregated over the window. The usage rows and the new readings are
written in one transaction per chunk of tenants, and the unique key (tenant, metric, window)
makes a second run of the same window write nothing:

========================  ===========  ===================================================
metric                    aggregation  value of one window
========================  ===========  ===================================================
``cpu_seconds``           sum          CPU seconds used (counter delta)
``requests``              sum          requests served (counter delta): through the tenant's
                                       entry point on the load balancer when it has one (what
                                       its users sent), else as its instances count them
``bandwidth_bytes``       sum          bytes received plus sent (counter deltas)
``storage_bytes``         max          the peak of the tenant's total at the readings
                                       that bound the window (instances' disk, datastore)
``memory_bytes``          avg          time-weighted mean of the resident memory
========================  ===========  ===================================================

``sum`` and ``max`` are Lago's and OpenMeter's aggregations of the same names; ``avg`` is
Lago's weighted sum over the window (each value weighed by how long it held, divided by the
window's length). Memory is only known at readings, so between two readings it is taken as
the straight line joining them, and before the first and after the last it holds its value.
A counter below its last reading was reset (its process restarted): its whole value is new
usage, never a negative amount.

Metering calls no plugin itself: the task layer hands it a :class:`SourceReader` that reads
instances through their platform and pool shares and datastores through their provisioner.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime as dt
import http.client
import itertools
import json
import time
import urllib.request
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import structlog
from sqlalchemy import Table, exists, select, text
from sqlalchemy.dialects import postgresql, sqlite

from schemas.states import TenantStatus
from workers.economics._usage_sql import write_window
from workers.runtime.errors import Cul8erError, NotFoundError
from workers.runtime.models import Base, Instance, MeterReading, Tenant, UsageRecord, utcnow
from workers.runtime.schedule import slot_start

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from schemas.platform import InstanceStats
    from workers.runtime.settings import Settings

__all__ = [
    "AGGREGATIONS",
    "CLAIM_METRIC",
    "COUNTERS",
    "ChunkResult",
    "GAUGES",
    "Reading",
    "Sample",
    "SourceReader",
    "TenantSources",
    "Window",
    "active_tenant_ids",
    "aggregate",
    "chunked",
    "counter_delta",
    "load_sources",
    "meter_chunk",
    "metered_tenants",
    "read_requests",
    "read_samples",
    "record",
    "time_weighted_average",
    "usage_of",
    "window_for",
]

log = structlog.get_logger(__name__)

#: Each usage metric and how its window is aggregated.
AGGREGATIONS: Final[dict[str, str]] = {
    "cpu_seconds": "sum",
    "requests": "sum",
    "bandwidth_bytes": "sum",
    "storage_bytes": "max",
    "memory_bytes": "avg",
}
#: Monotonic counters read from a source, and the usage metric each one adds to.
COUNTERS: Final[dict[str, str]] = {
    "cpu_seconds": "cpu_seconds",
    "requests": "requests",
    "rx_bytes": "bandwidth_bytes",
    "tx_bytes": "bandwidth_bytes",
}
#: Gauges read from a source (their usage metric has the same name).
GAUGES: Final = ("memory_bytes", "storage_bytes")
#: The row inserted first for each tenant: whoever inserts it owns the tenant's window.
CLAIM_METRIC: Final = "cpu_seconds"
#: First key of the PostgreSQL advisory locks metering takes per tenant ("mete").
LOCK_NAMESPACE: Final = 0x6D657465
#: How long reading an instance's ``/metrics`` may take (seconds).
METRICS_TIMEOUT: Final = 1.0
#: The source name of a tenant's own database.
DATASTORE_SOURCE: Final = "datastore"
#: The source name of a tenant's share of a shared pool.
PLACEMENT_SOURCE: Final = "placement"
#: The source name of a tenant's entry point on the load balancer (its requests).
ENTRY_SOURCE: Final = "entry"
#: Sources of a chunk read at once, at most, once reads turn out slow (an engine that
#: samples before it answers, a plugin behind a queue).
READ_THREADS: Final = 32
#: Two reads in a row slower than this (seconds) send the chunk's remaining reads to
#: threads; quicker ones stay in this thread, where a hand-off would cost more than the
#: read. Two, not one: on a busy machine a quick read is sometimes held up once.
SLOW_READ_SECONDS: Final = 0.05

#: An opener that never sends loopback requests through an HTTP proxy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Window:
    """One metering window, ``[start, end)``, aware UTC."""

    start: dt.datetime
    end: dt.datetime

    @property
    def seconds(self) -> float:
        """The window's length in seconds."""
        return (self.end - self.start).total_seconds()

    def to_json(self) -> dict[str, str]:
        """The window as task kwargs."""
        return {"window_start": self.start.isoformat(), "window_end": self.end.isoformat()}

    @classmethod
    def parse(cls, start: str, end: str) -> Window:
        """The window of two ISO timestamps (a naive one is taken as UTC)."""
        first, last = (_aware(dt.datetime.fromisoformat(value)) for value in (start, end))
        if last <= first:
            raise ValueError(f"window end {end} is not after its start {start}")
        return cls(first, last)


@dataclass(frozen=True)
class Reading:
    """The last value a source's counter or gauge showed, and when."""

    value: float
    taken_at: dt.datetime


@dataclass(frozen=True)
class Sample:
    """What one source of a tenant showed at ``taken_at``: counters and gauges by name."""

    tenant_id: str
    source: str
    taken_at: dt.datetime
    values: Mapping[str, float]


@dataclass(frozen=True)
class TenantSources:
    """Where a tenant's counters are read: its instances, its datastore, its pool share."""

    tenant_id: str
    platform: str
    #: ``(name, platform, endpoint)`` of each instance.
    instances: tuple[tuple[str, str, str | None], ...] = ()
    #: The shared-pool provisioner the tenant is placed with (``None``: own instances).
    placement: str | None = None
    has_datastore: bool = False
    #: Whether it has an entry point on the load balancer: its requests are counted there
    #: (what its users sent), not on its instances.
    entry: bool = False


class SourceReader(Protocol):
    """What metering reads a tenant's sources through (the plugins, handed in by the tasks)."""

    def instance_stats(self, platform: str, instance: str) -> InstanceStats:
        """The counters and gauges of ``instance`` as its ``platform`` reads them now."""
        ...

    def provisioner_usage(self, provisioner: str, tenant_id: str) -> Mapping[str, float]:
        """The counters ``provisioner`` keeps for the tenant (a pool share, a datastore), now."""
        ...

    def entry_requests(self, tenant_id: str) -> float:
        """The requests the tenant's entry point received (a counter, reset on a reload)."""
        ...


@dataclass
class ChunkResult:
    """What metering a chunk of tenants did."""

    metered: list[str] = field(default_factory=list)
    #: Tenants whose window was metered before (a redelivery, a second beat).
    already: list[str] = field(default_factory=list)
    #: Tenants not active any more, or gone.
    skipped: list[str] = field(default_factory=list)
    rows: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON summary (counts, not lists: a chunk may hold thousands of tenants)."""
        return {
            "metered": len(self.metered),
            "already_metered": len(self.already),
            "skipped": len(self.skipped),
            "rows": self.rows,
        }


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def window_for(interval: float, *, now: dt.datetime | None = None) -> Window:
    """The window a run at ``now`` meters: the slot before the one ``now`` falls in."""
    end = slot_start(interval, now=now)
    return Window(end - dt.timedelta(seconds=int(interval) or 1), end)


def chunked(items: Sequence[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of at most ``size``."""
    step = max(1, size)
    for index in range(0, len(items), step):
        yield list(items[index : index + step])


# -- pure aggregation ---------------------------------------------------------------------------


def counter_delta(previous: Reading | None, value: float) -> float:
    """How much a counter grew since ``previous``.

    A counter lower than its last reading was reset (its process restarted and counts from
    zero again), so everything it shows now is new usage, never a negative amount. With no
    reading yet, the counter has counted from zero since its source started.
    """
    if previous is None or value < previous.value:
        return max(0.0, value)
    return value - previous.value


def _on_line(t0: dt.datetime, v0: float, t1: dt.datetime, v1: float, moment: dt.datetime) -> float:
    """The value at ``moment`` of the line from ``(t0, v0)`` to ``(t1, v1)``."""
    return v0 + (v1 - v0) * (moment - t0).total_seconds() / (t1 - t0).total_seconds()


def time_weighted_average(
    points: Iterable[tuple[dt.datetime, float]], start: dt.datetime, end: dt.datetime
) -> float:
    """The mean over ``[start, end)`` of the line through ``points``, each weighed by duration.

    Between two points the value is the straight line joining them; before the first and
    after the last one it holds that point's value. One point is its own average; none is 0.
    """
    ordered = sorted(points)
    if not ordered:
        return 0.0
    if len(ordered) == 1 or end <= start:
        return float(ordered[-1][1])
    # The piecewise-linear function, extended flat to both ends of the window.
    knots = list(ordered)
    if knots[0][0] > start:
        knots.insert(0, (start, knots[0][1]))
    if knots[-1][0] < end:
        knots.append((end, knots[-1][1]))
    area = 0.0
    for (t0, v0), (t1, v1) in itertools.pairwise(knots):
        lo, hi = max(t0, start), min(t1, end)
        if hi <= lo or t1 <= t0:
            continue
        # The trapezoid under the line between lo and hi.
        mean = (_on_line(t0, v0, t1, v1, lo) + _on_line(t0, v0, t1, v1, hi)) / 2
        area += mean * (hi - lo).total_seconds()
    return area / (end - start).total_seconds()


def aggregate(
    tenant_ids: Iterable[str],
    samples: Iterable[Sample],
    readings: Mapping[tuple[str, str, str], Reading],
    window: Window,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Each tenant's usage for ``window`` and the readings to keep for the next one.

    ``readings`` maps ``(tenant, source, metric)`` to the last reading. A sample no newer
    than its reading was overtaken by a later run (two windows metered at once) and counts
    for nothing, so no usage is counted twice.
    """
    usage: dict[str, dict[str, float]] = {t: dict.fromkeys(AGGREGATIONS, 0.0) for t in tenant_ids}
    storage_now: dict[str, float] = defaultdict(float)
    storage_before: dict[str, float] = defaultdict(float)
    kept: list[dict[str, Any]] = []
    for sample in samples:
        totals = usage.get(sample.tenant_id)
        if totals is None:
            continue
        for name, raw in sample.values.items():
            value = float(raw)
            previous = readings.get((sample.tenant_id, sample.source, name))
            if previous is not None and previous.taken_at >= sample.taken_at:
                continue
            if name in COUNTERS:
                totals[COUNTERS[name]] += counter_delta(previous, value)
            elif name == "memory_bytes":
                points = [(sample.taken_at, value)]
                if previous is not None:
                    points.insert(0, (previous.taken_at, previous.value))
                totals["memory_bytes"] += time_weighted_average(points, window.start, window.end)
            elif name == "storage_bytes":
                storage_now[sample.tenant_id] += value
                if previous is not None and window.start <= previous.taken_at < window.end:
                    storage_before[sample.tenant_id] += previous.value
            else:
                continue
            kept.append(
                {
                    "tenant_id": sample.tenant_id,
                    "source": sample.source,
                    "metric": name,
                    "value": value,
                    "taken_at": sample.taken_at,
                }
            )
    for tenant_id, totals in usage.items():
        totals["storage_bytes"] = max(storage_now[tenant_id], storage_before[tenant_id])
    return usage, kept


# -- reading the sources ------------------------------------------------------------------------


def active_tenant_ids(session: Session) -> list[str]:
    """Every active tenant's id, sorted."""
    query = select(Tenant.id).where(Tenant.status == TenantStatus.ACTIVE).order_by(Tenant.id)
    return list(session.scalars(query))


def _chunk_state(
    session: Session, tenant_ids: Sequence[str], window: Window
) -> tuple[dict[str, TenantSources], set[str]]:
    """:func:`load_sources` and :func:`metered_tenants` of a chunk in one query (one row
    per instance, or per tenant without one)."""
    claimed = (
        exists()
        .where(
            UsageRecord.tenant_id == Tenant.id,
            UsageRecord.metric == CLAIM_METRIC,
            UsageRecord.window_start == window.start,
        )
        .label("claimed")
    )
    query = (
        select(
            Tenant.id,
            Tenant.platform,
            Tenant.placement,
            Tenant.resources,
            Tenant.status,
            claimed,
            Instance.name,
            Instance.platform,
            Instance.endpoint,
        )
        .outerjoin(Instance, Instance.tenant_id == Tenant.id)
        .where(Tenant.id.in_(tenant_ids))
        .order_by(Tenant.id, Instance.name)
    )
    tenants: dict[str, TenantSources] = {}
    instances: dict[str, list[tuple[str, str, str | None]]] = defaultdict(list)
    done: set[str] = set()
    for tid, platform, placement, resources, status, is_done, name, on, endpoint in session.execute(
        query
    ):
        if is_done:
            done.add(tid)
        if status != TenantStatus.ACTIVE:
            continue
        if name is not None:
            instances[tid].append((name, on, endpoint))
        tenants[tid] = TenantSources(
            tenant_id=tid,
            platform=platform,
            placement=placement,
            has_datastore=bool((resources or {}).get("datastore")),
            entry=bool((resources or {}).get("entry")),
        )
    return {
        tid: dataclasses.replace(tenant, instances=tuple(instances.get(tid, ())))
        for tid, tenant in tenants.items()
    }, done


def load_sources(session: Session, tenant_ids: Sequence[str]) -> dict[str, TenantSources]:
    """The sources of each of ``tenant_ids`` that is still active."""
    # By primary key alone (the status is checked below): an index on the status would
    # match every active tenant.
    rows = [
        (tenant_id, platform, placement, resources)
        for tenant_id, platform, placement, resources, status in session.execute(
            select(
                Tenant.id, Tenant.platform, Tenant.placement, Tenant.resources, Tenant.status
            ).where(Tenant.id.in_(tenant_ids))
        )
        if status == TenantStatus.ACTIVE
    ]
    instances: dict[str, list[tuple[str, str, str | None]]] = defaultdict(list)
    for tenant_id, name, platform, endpoint in session.execute(
        select(Instance.tenant_id, Instance.name, Instance.platform, Instance.endpoint)
        .where(Instance.tenant_id.in_(tenant_ids))
        .order_by(Instance.tenant_id, Instance.name)
    ):
        instances[tenant_id].append((name, platform, endpoint))
    return {
        tenant_id: TenantSources(
            tenant_id=tenant_id,
            platform=platform,
            instances=tuple(instances.get(tenant_id, ())),
            placement=placement,
            has_datastore=bool((resources or {}).get("datastore")),
            entry=bool((resources or {}).get("entry")),
        )
        for tenant_id, platform, placement, resources in rows
    }


def metered_tenants(session: Session, tenant_ids: Iterable[str], window: Window) -> set[str]:
    """Which of ``tenant_ids`` have ``window`` metered already (its claim row is written)."""
    return set(
        session.scalars(
            select(UsageRecord.tenant_id).where(
                UsageRecord.tenant_id.in_(list(tenant_ids)),
                UsageRecord.metric == CLAIM_METRIC,
                UsageRecord.window_start == window.start,
            )
        )
    )


def read_requests(endpoint: str | None) -> float | None:
    """The requests an instance's service reports on ``/metrics``; ``None``: no answer.

    Requests the control plane makes itself (``/health`` probes, ``/metrics`` reads, this
    one included) are not the tenant's usage: a service that counts them apart as
    ``probe_requests`` has them taken off.
    """
    if not endpoint:
        return None
    try:
        with _DIRECT.open(f"http://{endpoint}/metrics", timeout=METRICS_TIMEOUT) as response:
            data = json.load(response)
        return max(0.0, float(data["requests"]) - float(data.get("probe_requests", 0)))
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as exc:
        log.debug("instance_requests_unreadable", endpoint=endpoint, error=str(exc))
        return None


def _guarded(tenant_id: str, source: str, read: Callable[[], Sample | None]) -> Sample | None:
    """``read()``, or ``None`` (logged) when the source cannot be read right now."""
    try:
        return read()
    except NotFoundError:
        return None  # destroyed since it was listed
    except Cul8erError as exc:
        log.warning("meter_source_unreadable", tenant_id=tenant_id, source=source, error=str(exc))
    except Exception:
        # One misbehaving plugin must not leave the rest of the chunk unmetered.
        log.exception("meter_source_failed", tenant_id=tenant_id, source=source)
    return None


def _instance_sample(
    reader: SourceReader,
    tenant_id: str,
    name: str,
    platform: str,
    endpoint: str | None,
    *,
    requests_here: bool = True,
) -> Sample:
    """An instance's counters from its platform, and its requests from its ``/metrics``
    (unless ``requests_here`` is false: they are counted at the entry point)."""
    stats = reader.instance_stats(platform, name)
    values = {
        "cpu_seconds": float(stats.cpu_seconds),
        "memory_bytes": float(stats.memory_bytes),
        "storage_bytes": float(stats.disk_bytes),
        "rx_bytes": float(stats.rx_bytes),
        "tx_bytes": float(stats.tx_bytes),
    }
    requests = read_requests(endpoint) if requests_here else None
    if requests is not None:
        values["requests"] = requests
    return Sample(tenant_id, name, utcnow(), values)


def _entry_sample(reader: SourceReader, tenant_id: str) -> Sample:
    """The requests through the tenant's entry point on the load balancer."""
    return Sample(tenant_id, ENTRY_SOURCE, utcnow(), {"requests": reader.entry_requests(tenant_id)})


def _pool_share_sample(reader: SourceReader, tenant_id: str, provisioner: str) -> Sample:
    """A tenant's share of a shared pool: a pool's instances serve many tenants, so the
    provisioner knows this one's share."""
    metrics = reader.provisioner_usage(provisioner, tenant_id)
    values = {k: v for k, v in metrics.items() if k in COUNTERS or k in GAUGES}
    if "disk_bytes" in metrics:
        values["storage_bytes"] = metrics["disk_bytes"]
    return Sample(tenant_id, PLACEMENT_SOURCE, utcnow(), values)


def _datastore_sample(reader: SourceReader, tenant_id: str, provisioner: str) -> Sample | None:
    """The storage of a tenant's own database, as its data provisioner reports it."""
    metrics = reader.provisioner_usage(provisioner, tenant_id)
    if "storage_bytes" not in metrics:
        return None
    return Sample(
        tenant_id, DATASTORE_SOURCE, utcnow(), {"storage_bytes": metrics["storage_bytes"]}
    )


def _source_reads(
    tenant: TenantSources, reader: SourceReader, data_provisioner: str
) -> list[tuple[str, Callable[[], Sample | None]]]:
    """Each source of ``tenant`` by name, with the call that reads it."""
    tid = tenant.tenant_id
    reads: list[tuple[str, Callable[[], Sample | None]]] = []
    if tenant.placement:
        reads.append((PLACEMENT_SOURCE, partial(_pool_share_sample, reader, tid, tenant.placement)))
    else:
        here = not tenant.entry
        reads.extend(
            (
                name,
                partial(
                    _instance_sample,
                    reader,
                    tid,
                    name,
                    platform_name,
                    endpoint,
                    requests_here=here,
                ),
            )
            for name, platform_name, endpoint in tenant.instances
        )
        if tenant.entry:
            reads.append((ENTRY_SOURCE, partial(_entry_sample, reader, tid)))
    if tenant.has_datastore:
        reads.append((DATASTORE_SOURCE, partial(_datastore_sample, reader, tid, data_provisioner)))
    return reads


def read_samples(
    sources: Iterable[TenantSources],
    settings: Settings,
    reader: SourceReader,
    *,
    threads: int = READ_THREADS,
) -> list[Sample]:
    """Read every source of every tenant now; a source that cannot be read is left out.

    A source left out keeps its last reading, so its usage is counted by the next window
    that reads it: late, never lost. Reads run here one by one while they are quick; once
    two in a row are slow, the rest are read at once, ``threads`` at a time.
    """
    reads = [
        (tenant.tenant_id, source, read)
        for tenant in sources
        for source, read in _source_reads(tenant, reader, settings.data_provisioner)
    ]
    found: list[Sample | None] = []
    slow = 0
    for index, (tenant_id, source, read) in enumerate(reads):
        started = time.perf_counter()
        found.append(_guarded(tenant_id, source, read))
        slow = slow + 1 if time.perf_counter() - started > SLOW_READ_SECONDS else 0
        if slow == 2 and threads > 1:
            found.extend(_read_at_once(reads[index + 1 :], threads))
            break
    return [sample for sample in found if sample is not None]


def _read_at_once(
    reads: Sequence[tuple[str, str, Callable[[], Sample | None]]], threads: int
) -> list[Sample | None]:
    """Each of ``reads`` in a bounded pool of threads, each under this thread's log context."""
    if not reads:
        return []
    # A copy of the context per read: one context cannot be entered by two threads at once.
    jobs = [(contextvars.copy_context(), item) for item in reads]
    with ThreadPoolExecutor(
        max_workers=min(threads, len(jobs)), thread_name_prefix="cul8er-meter"
    ) as pool:
        return list(pool.map(lambda job: job[0].run(_guarded, *job[1]), jobs))


# -- writing ------------------------------------------------------------------------------------


def _insert(session: Session, model: type[Base]) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT."""
    dialect = session.get_bind().dialect.name
    table = cast("Table", model.__table__)
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"metering writes need PostgreSQL or SQLite, not {dialect}")


def _by_key(session: Session) -> None:
    """Have PostgreSQL read this transaction's rows through their keys, whatever its statistics.

    Every read here fetches one chunk's rows by primary or unique key. Right after many
    tenants arrive, the tables' statistics (until autovacuum's next ANALYZE) still describe
    them as small, and the planner would scan them whole once per chunk instead.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL enable_seqscan = off"))


def _lock_tenants(session: Session, tenant_ids: Iterable[str]) -> None:
    """Hold each tenant's metering lock until commit (PostgreSQL; SQLite's writer lock is one).

    Two runs of different windows for the same tenant would otherwise both count the usage
    since the same reading. The keys are taken in one sorted order, so runs never deadlock.
    The same round trip sets what :func:`_by_key` sets, for the reads and writes after it.
    The commit waits for its WAL flush: usage is what invoices are made of, and a window's
    memory average and peak storage could not be counted again after a database crash.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    keys = sorted({zlib.crc32(t.encode()) - 2**31 for t in tenant_ids})
    if keys:
        session.execute(
            text(
                "SELECT set_config('enable_seqscan', 'off', true), "
                "(SELECT count(pg_advisory_xact_lock(:ns, k)) "
                "FROM unnest(CAST(:keys AS int[])) AS k)"
            ),
            {"ns": LOCK_NAMESPACE, "keys": keys},
        )


def _readings(session: Session, tenant_ids: Sequence[str]) -> dict[tuple[str, str, str], Reading]:
    rows = session.execute(
        select(
            MeterReading.tenant_id,
            MeterReading.source,
            MeterReading.metric,
            MeterReading.value,
            MeterReading.taken_at,
        ).where(MeterReading.tenant_id.in_(tenant_ids))
    )
    return {(t, s, m): Reading(v, at) for t, s, m, v, at in rows}


def record(
    session: Session, tenant_ids: Sequence[str], samples: Iterable[Sample], window: Window
) -> tuple[set[str], int]:
    """Write ``window``'s usage rows and the new readings; the tenants written and the row count.

    Inside the caller's transaction: a tenant whose window is metered already (its claim row
    exists) gets nothing written, neither rows nor readings, so a repeat changes nothing.
    """
    if not tenant_ids:
        return set(), 0
    _lock_tenants(session, tenant_ids)
    usage, kept = aggregate(tenant_ids, samples, _readings(session, tenant_ids), window)
    now = utcnow()
    won: set[str] | None = None
    if session.get_bind().dialect.name == "postgresql":
        won = write_window(
            session,
            (window.start, window.end),
            usage,
            AGGREGATIONS,
            kept,
            claim=CLAIM_METRIC,
            now=now,
        )
    if won is None:
        won = _write_rows(session, window, usage, kept, now)
    return won, len(won) * len(AGGREGATIONS)


def _write_rows(
    session: Session,
    window: Window,
    usage: Mapping[str, Mapping[str, float]],
    kept: Sequence[dict[str, Any]],
    now: dt.datetime,
) -> set[str]:
    """The write of :func:`record` row by row (SQLite): the claims, then the winners' rest."""

    def row(tenant_id: str, metric: str) -> dict[str, Any]:
        return {
            "tenant_id": tenant_id,
            "metric": metric,
            "window_start": window.start,
            "window_end": window.end,
            "value": usage[tenant_id][metric],
            "aggregation": AGGREGATIONS[metric],
            "recorded_at": now,
        }

    claims = (
        _insert(session, UsageRecord)
        .on_conflict_do_nothing(index_elements=["tenant_id", "metric", "window_start"])
        .returning(UsageRecord.__table__.c.tenant_id)
    )
    won = set(session.scalars(claims, [row(t, CLAIM_METRIC) for t in sorted(usage)]).all())
    if not won:
        return won
    rest = [row(t, m) for t in sorted(won) for m in AGGREGATIONS if m != CLAIM_METRIC]
    session.execute(
        _insert(session, UsageRecord).on_conflict_do_nothing(
            index_elements=["tenant_id", "metric", "window_start"]
        ),
        rest,
    )
    upsert = _insert(session, MeterReading)
    upsert = upsert.on_conflict_do_update(
        index_elements=["tenant_id", "source", "metric"],
        set_={"value": upsert.excluded.value, "taken_at": upsert.excluded.taken_at},
    )
    mine = [reading for reading in kept if reading["tenant_id"] in won]
    if mine:
        session.execute(upsert, mine)
    return won


def usage_of(session: Session, tenant_id: str, window: Window) -> dict[str, float]:
    """The tenant's usage rows of ``window``, metric → value."""
    rows = session.execute(
        select(UsageRecord.metric, UsageRecord.value).where(
            UsageRecord.tenant_id == tenant_id, UsageRecord.window_start == window.start
        )
    )
    return {metric: value for metric, value in rows}


def meter_chunk(
    tenant_ids: Sequence[str],
    window: Window,
    settings: Settings,
    reader: SourceReader,
    *,
    url: str | None = None,
) -> ChunkResult:
    """Meter ``window`` for ``tenant_ids``: read their sources, then write in one transaction.

    Tenants whose window is metered already are not read again; the sources are read outside
    any transaction (SQLite lets one writer in at a time, and reads can be slow).
    """
    from workers.runtime.db import session_scope

    result = ChunkResult()
    ids = sorted(set(tenant_ids))
    with session_scope(url) as session:
        _by_key(session)
        sources, done = _chunk_state(session, ids, window)
    result.already = sorted(done)
    result.skipped = sorted(set(ids) - set(sources) - done)
    todo = [sources[t] for t in ids if t in sources and t not in done]
    if not todo:
        return result
    samples = read_samples(todo, settings, reader)
    with session_scope(url) as session:
        # record() takes the tenants' locks first, which also reads by key (_lock_tenants).
        won, rows = record(session, [t.tenant_id for t in todo], samples, window)
    result.metered = sorted(won)
    result.already = sorted(done | {t.tenant_id for t in todo} - won)
    result.rows = rows
    return result
