"""Metering's rules: deltas, aggregations, and the write that happens once per window.

The arithmetic is checked as pure functions; the writes on real SQLite and PostgreSQL
databases (PostgreSQL also with two writers at once); the reads on a real local instance.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import func, select

from plugins.platforms.local import LocalPlatform
from schemas.platform import InstanceSpec
from schemas.states import TenantStatus
from tasks.metering import PluginSources
from tests.conftest import require
from tests.stack import create_pg_database, drop_pg_database
from workers.economics import metering
from workers.economics.metering import Reading, Sample, Window
from workers.runtime.db import session_scope
from workers.runtime.errors import TransientError
from workers.runtime.migrate import upgrade
from workers.runtime.models import Instance, MeterReading, Tenant, UsageRecord, utcnow
from workers.runtime.settings import Settings

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def window(n: int, length: int = 60) -> Window:
    """The ``n``-th window after T0."""
    return Window(at(n * length), at((n + 1) * length))


# -- pure arithmetic ----------------------------------------------------------------------------


def test_a_counter_delta_is_its_growth_and_a_reset_is_never_negative() -> None:
    # Given a counter last read at 100
    last = Reading(100.0, T0)
    # Then growth is the difference, and a lower value (a restart) counts from zero again
    assert metering.counter_delta(last, 130.0) == 30.0
    assert metering.counter_delta(last, 100.0) == 0.0
    assert metering.counter_delta(last, 7.0) == 7.0
    # And a counter never read before has counted from zero since its source started
    assert metering.counter_delta(None, 12.5) == 12.5


def test_time_weighted_average_weighs_each_value_by_how_long_it_held() -> None:
    start, end = at(0), at(60)
    # One reading is its own average; none is zero
    assert metering.time_weighted_average([(at(30), 500.0)], start, end) == 500.0
    assert metering.time_weighted_average([], start, end) == 0.0
    # A straight line from 100 to 300 across the window averages 200
    assert metering.time_weighted_average([(at(0), 100.0), (at(60), 300.0)], start, end) == 200.0
    # 0 for the first 45 s (held before the first reading), then a ramp to 400 over 15 s
    points = [(at(45), 0.0), (at(60), 400.0)]
    assert metering.time_weighted_average(points, start, end) == pytest.approx(50.0)
    # Readings outside the window only shape the line inside it: 1000 → 0 over [-60, 60)
    points = [(at(-60), 1000.0), (at(60), 0.0)]
    assert metering.time_weighted_average(points, start, end) == pytest.approx(250.0)
    # 200 at 10 s, 800 at 130 s: 200 held for 10 s, then the line up to 450 at 60 s
    points = [(at(130), 800.0), (at(10), 200.0)]
    expected = (200 * 10 + (200 + 450) / 2 * 50) / 60
    assert metering.time_weighted_average(points, start, end) == pytest.approx(expected)


def test_windows_are_the_slot_before_the_run() -> None:
    # Given a run 17 s into the 12:03 slot of a 60 s interval
    w = metering.window_for(60, now=at(3 * 60 + 17))
    # Then it meters 12:02-12:03
    assert (w.start, w.end) == (at(120), at(180))
    assert w.seconds == 60
    assert Window.parse(*w.to_json().values()) == w
    with pytest.raises(ValueError, match="not after"):
        Window.parse(w.end.isoformat(), w.start.isoformat())
    assert list(metering.chunked(["a", "b", "c", "d", "e"], 2)) == [["a", "b"], ["c", "d"], ["e"]]


def test_aggregate_sums_counters_peaks_storage_and_averages_memory() -> None:
    w = window(1)
    readings = {
        ("acme", "i0", "cpu_seconds"): Reading(10.0, at(61)),
        ("acme", "i0", "rx_bytes"): Reading(1000.0, at(61)),
        ("acme", "i0", "tx_bytes"): Reading(5000.0, at(61)),
        ("acme", "i0", "requests"): Reading(40.0, at(61)),
        ("acme", "i0", "memory_bytes"): Reading(100.0, at(60)),
        ("acme", "i0", "storage_bytes"): Reading(900.0, at(61)),
        ("acme", "i1", "cpu_seconds"): Reading(50.0, at(61)),
    }
    samples = [
        Sample(
            "acme",
            "i0",
            at(120),
            {
                "cpu_seconds": 12.5,
                "rx_bytes": 1500.0,
                "tx_bytes": 5100.0,
                "requests": 45.0,
                "memory_bytes": 300.0,
                "storage_bytes": 700.0,
            },
        ),
        # i1 restarted: its counter went back to 3 (3 s since the restart, never -47)
        Sample("acme", "i1", at(120), {"cpu_seconds": 3.0, "memory_bytes": 50.0}),
        Sample("acme", "datastore", at(120), {"storage_bytes": 400.0}),
    ]

    # When one window is aggregated for acme and an idle tenant
    usage, kept = metering.aggregate(["acme", "idle"], samples, readings, w)

    # Then counters add up, storage is its peak, memory its time-weighted mean
    assert usage["acme"] == {
        "cpu_seconds": pytest.approx(2.5 + 3.0),
        "requests": 5.0,
        "bandwidth_bytes": 500.0 + 100.0,
        "storage_bytes": max(700.0 + 400.0, 900.0),
        "memory_bytes": pytest.approx(200.0 + 50.0),
        # i0: the line 100 → 300 over the window; i1: one reading, its own mean
    }
    assert usage["idle"] == dict.fromkeys(metering.AGGREGATIONS, 0.0)
    # And every value read is kept as the next window's baseline
    assert len(kept) == 6 + 2 + 1
    assert {(r["source"], r["metric"]): r["value"] for r in kept}[("i1", "cpu_seconds")] == 3.0


def test_a_sample_older_than_its_reading_counts_for_nothing() -> None:
    # Given a later run already read the counter at 20 (taken after this sample)
    readings = {("acme", "i0", "cpu_seconds"): Reading(20.0, at(125))}
    sample = Sample("acme", "i0", at(121), {"cpu_seconds": 15.0})
    # When the overtaken sample is aggregated
    usage, kept = metering.aggregate(["acme"], [sample], readings, window(1))
    # Then it is neither mistaken for a reset nor kept as a baseline
    assert usage["acme"]["cpu_seconds"] == 0.0
    assert kept == []


# -- writes on real databases ------------------------------------------------------------------


@pytest.fixture
def pg() -> Iterator[str]:
    require("postgres")
    url = create_pg_database()
    try:
        upgrade(url)
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgres":
        yield request.getfixturevalue("pg")
        return
    url = f"sqlite:///{tmp_path / 'metering.db'}"
    upgrade(url)
    yield url


def add_tenant(
    url: str, tenant_id: str, *, status: str = TenantStatus.ACTIVE, **extra: object
) -> None:
    with session_scope(url) as session:
        session.add(
            Tenant(
                id=tenant_id,
                name=tenant_id,
                plan="free",
                status=status,
                platform="local",
                resources={},
                meta={},
                billing_anchor=T0.date(),
                **extra,
            )
        )


def write(url: str, tenants: list[str], samples: list[Sample], w: Window) -> tuple[set[str], int]:
    with session_scope(url) as session:
        return metering.record(session, tenants, samples, w)


def usage(url: str, tenant_id: str) -> dict[tuple[dt.datetime, str], float]:
    with session_scope(url) as session:
        rows = session.execute(
            select(UsageRecord.window_start, UsageRecord.metric, UsageRecord.value).where(
                UsageRecord.tenant_id == tenant_id
            )
        )
        return {(start, metric): value for start, metric, value in rows}


def readings(url: str, tenant_id: str) -> dict[tuple[str, str], float]:
    with session_scope(url) as session:
        rows = session.execute(
            select(MeterReading.source, MeterReading.metric, MeterReading.value).where(
                MeterReading.tenant_id == tenant_id
            )
        )
        return {(source, metric): value for source, metric, value in rows}


def cpu(tenant: str, value: float, when: dt.datetime, source: str = "i0") -> Sample:
    return Sample(tenant, source, when, {"cpu_seconds": value, "memory_bytes": 10.0})


def test_a_window_is_written_once_with_its_readings(db: str) -> None:
    # Given two tenants metered for the first time
    won, rows = write(db, ["a", "b"], [cpu("a", 4.0, at(61)), cpu("b", 1.0, at(61))], window(0))
    # Then each gets one row per metric and its readings
    assert won == {"a", "b"} and rows == 10
    assert usage(db, "a")[(at(0), "cpu_seconds")] == 4.0
    assert readings(db, "a") == {("i0", "cpu_seconds"): 4.0, ("i0", "memory_bytes"): 10.0}

    # When the same window is written again with newer counters (a redelivery)
    won, rows = write(db, ["a", "b"], [cpu("a", 9.0, at(65)), cpu("b", 9.0, at(65))], window(0))

    # Then nothing changes: no row, no reading
    assert won == set() and rows == 0
    assert usage(db, "a")[(at(0), "cpu_seconds")] == 4.0
    assert readings(db, "a")[("i0", "cpu_seconds")] == 4.0

    # And the next window counts from the kept reading, a reset from zero
    write(db, ["a", "b"], [cpu("a", 9.0, at(121)), cpu("b", 0.5, at(121))], window(1))
    assert usage(db, "a")[(at(60), "cpu_seconds")] == 5.0
    assert usage(db, "b")[(at(60), "cpu_seconds")] == 0.5
    with session_scope(db) as session:
        assert session.scalar(select(func.count()).select_from(UsageRecord)) == 20
        aggregations = dict(
            session.execute(select(UsageRecord.metric, UsageRecord.aggregation).distinct()).all()
        )
    assert aggregations == metering.AGGREGATIONS


def test_a_tenant_metered_already_is_left_alone_in_a_mixed_chunk(db: str) -> None:
    # Given tenant a's window was written by another chunk (a direct meter_tenant call)
    write(db, ["a"], [cpu("a", 2.0, at(61))], window(0))
    # When a chunk of a and b is written for the same window
    won, rows = write(db, ["a", "b"], [cpu("a", 8.0, at(62)), cpu("b", 3.0, at(62))], window(0))
    # Then only b is written; a keeps its row and its reading
    assert won == {"b"} and rows == 5
    assert usage(db, "a")[(at(0), "cpu_seconds")] == 2.0
    assert readings(db, "a")[("i0", "cpu_seconds")] == 2.0


def test_two_writers_of_one_window_at_once_write_it_once(pg: str) -> None:
    # (PostgreSQL: SQLite lets one writer in at a time, so nothing races there.)
    db = pg
    tenants = [f"t{i:03d}" for i in range(200)]
    write(db, tenants, [cpu(t, 10.0, at(1)) for t in tenants], window(-1))
    barrier = threading.Barrier(2)
    outcomes: list[tuple[set[str], int]] = []

    def deliver(value: float) -> None:
        samples = [cpu(t, value, at(61)) for t in tenants]
        barrier.wait()
        outcomes.append(write(db, list(reversed(tenants)), samples, window(0)))

    # When the same window is written by two transactions at the same moment
    threads = [threading.Thread(target=deliver, args=(v,)) for v in (12.0, 15.0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # Then one wins every tenant, the other none, and the readings are the winner's
    won = sorted(outcomes, key=lambda o: -len(o[0]))
    assert won[0][0] == set(tenants) and won[1][0] == set()
    with session_scope(db) as session:
        rows = session.execute(
            select(UsageRecord.value).where(
                UsageRecord.window_start == at(0), UsageRecord.metric == "cpu_seconds"
            )
        ).scalars()
        values = set(rows)
    assert len(values) == 1
    assert readings(db, tenants[0])[("i0", "cpu_seconds")] == 10.0 + values.pop()


def test_two_windows_written_at_once_never_count_usage_twice(pg: str) -> None:
    db = pg
    # Given a tenant whose counter reads 10, then 14 (for window 0) and 20 (for window 1)
    write(db, ["a"], [cpu("a", 10.0, at(1))], window(-1))
    barrier = threading.Barrier(2)

    def deliver(w: Window, sample: Sample) -> None:
        barrier.wait()
        write(db, ["a"], [sample], w)

    # When both windows are written at the same moment, in either order
    threads = [
        threading.Thread(target=deliver, args=(window(0), cpu("a", 14.0, at(61)))),
        threading.Thread(target=deliver, args=(window(1), cpu("a", 20.0, at(121)))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # Then the windows add up to the counter's growth: 10 (all before) + 10, nothing twice
    rows = usage(db, "a")
    total = sum(v for (_start, metric), v in rows.items() if metric == "cpu_seconds")
    assert total == 20.0
    assert readings(db, "a")[("i0", "cpu_seconds")] == 20.0


# -- reading a real local instance -------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Settings, LocalPlatform]]:
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'cul8er.db'}",
        broker_url="memory://",
    )
    upgrade(settings.sqlalchemy_url)
    platform = LocalPlatform.from_settings(settings)
    yield settings, platform
    for info in platform.list_instances():
        platform.destroy_instance(info.name)


def get(endpoint: str, path: str) -> bytes:
    with OPENER.open(f"http://{endpoint}{path}", timeout=30) as response:
        body: bytes = response.read()
        return body


def tree_cpu_seconds(pid: int) -> float:
    """The instance's own CPU time as psutil sees it: the process and its children."""
    proc = psutil.Process(pid)
    times = proc.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in proc.children(recursive=True):
        child_times = child.cpu_times()
        total += child_times.user + child_times.system
    return total


def test_a_real_instance_is_metered_window_after_window(
    local: tuple[Settings, LocalPlatform],
) -> None:
    settings, platform = local
    url = settings.sqlalchemy_url
    tenant_id = f"m{uuid.uuid4().hex[:8]}"
    # Given an active tenant with one running local instance
    info = platform.create_instance(InstanceSpec(name=f"t-{tenant_id}-app-0", tenant_id=tenant_id))
    assert info.endpoint is not None and info.provider_id is not None
    add_tenant(url, tenant_id)
    with session_scope(url) as session:
        session.add(
            Instance(
                tenant_id=tenant_id,
                name=info.name,
                platform="local",
                role="app",
                ordinal=0,
                status="running",
                endpoint=info.endpoint,
            )
        )
    now = utcnow()
    windows = [metering.window_for(1, now=now + dt.timedelta(seconds=n)) for n in range(3)]
    meter: Callable[[Window], metering.ChunkResult] = lambda w: metering.meter_chunk(  # noqa: E731
        [tenant_id, "gone"], w, settings, PluginSources(settings), url=url
    )

    # When it burns CPU and serves requests between three metering runs
    first = meter(windows[0])
    get(info.endpoint, "/burn?seconds=0.4")
    for _ in range(5):
        get(info.endpoint, "/")
    second = meter(windows[1])
    third = meter(windows[2])
    again = meter(windows[2])

    # Then each run wrote its window once (the unknown tenant is skipped, a repeat is no-op)
    assert first.metered == [tenant_id] and first.skipped == ["gone"]
    assert second.metered == third.metered == [tenant_id]
    assert again.metered == [] and again.already == [tenant_id] and again.rows == 0
    rows = usage(url, tenant_id)
    assert len(rows) == 3 * len(metering.AGGREGATIONS)
    # And the windows' CPU seconds add up to the process tree's own CPU time
    metered_cpu = sum(v for (_s, metric), v in rows.items() if metric == "cpu_seconds")
    assert metered_cpu == pytest.approx(tree_cpu_seconds(int(info.provider_id)), rel=0.05)
    assert rows[(windows[1].start, "cpu_seconds")] >= 0.35
    # And the requests in between were counted in the window that followed them
    assert rows[(windows[1].start, "requests")] >= 6  # /burn and five GETs of /
    assert rows[(windows[1].start, "bandwidth_bytes")] > 0
    assert rows[(windows[2].start, "memory_bytes")] > 0
    assert rows[(windows[2].start, "storage_bytes")] >= 0


class _Sources:
    """Counters a test hands metering as its source reader."""

    def instance_stats(self, platform: str, instance: str):  # noqa: ANN201
        from schemas.platform import InstanceStats

        return InstanceStats(cpu_seconds=1.0, memory_bytes=10, disk_bytes=0)

    def provisioner_usage(self, provisioner: str, tenant_id: str) -> dict[str, float]:
        return {}

    def entry_requests(self, tenant_id: str) -> float:
        return 42.0


def test_a_tenant_with_an_entry_point_is_billed_the_requests_its_users_sent_there(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path)
    behind = metering.TenantSources("acme", "local", (("t-acme-app-0", "local", None),), entry=True)
    samples = metering.read_samples([behind], settings, _Sources())
    by_source = {s.source: s.values for s in samples}
    # Requests come from the entry point, never also from the instances behind it
    assert by_source["entry"] == {"requests": 42.0}
    assert "requests" not in by_source["t-acme-app-0"]
    assert by_source["t-acme-app-0"]["cpu_seconds"] == 1.0


class _SlowSources(_Sources):
    """An engine that samples before it answers: every read takes ``delay`` seconds."""

    def __init__(self, delay: float, broken: str) -> None:
        self.delay = delay
        self.broken = broken
        self.threads: set[str] = set()
        self.context: set[object] = set()
        self._lock = threading.Lock()

    def instance_stats(self, platform: str, instance: str):  # noqa: ANN201
        import structlog

        with self._lock:
            self.threads.add(threading.current_thread().name)
            self.context.add(structlog.contextvars.get_contextvars().get("task_id"))
        time.sleep(self.delay)
        if instance == self.broken:
            raise TransientError("engine busy")
        return super().instance_stats(platform, instance)


def test_slow_sources_are_read_at_once_in_a_bounded_pool_and_a_failure_is_left_out(
    tmp_path: Path,
) -> None:
    import structlog

    # Given 40 tenants whose platform takes 0.2 s per read, one of them failing
    settings = Settings(data_dir=tmp_path)
    tenants = [
        metering.TenantSources(f"s{i:02d}", "docker", ((f"t-s{i:02d}-app-0", "docker", None),))
        for i in range(40)
    ]
    reader = _SlowSources(0.2, broken="t-s07-app-0")
    # When the chunk's sources are read, at most 8 at a time, under a task's log context
    structlog.contextvars.bind_contextvars(task_id="chunk-1")
    try:
        started = time.monotonic()
        samples = metering.read_samples(tenants, settings, reader, threads=8)
        took = time.monotonic() - started
    finally:
        structlog.contextvars.clear_contextvars()
    # Then every readable source is read once, the failing one left out (read next window)
    assert sorted(s.tenant_id for s in samples) == [f"s{i:02d}" for i in range(40) if i != 7]
    # And after two slow reads the rest ran 8 at a time: 0.4 + 38 / 8 rounds of 0.2 s
    assert took < 0.2 * 40 / 2
    assert 1 < len(reader.threads) <= 9  # the pool's 8 and the caller's own
    # And each read ran under the caller's log context
    assert reader.context == {"chunk-1"}


def test_quick_sources_are_read_in_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given tenants whose platform answers at once (quick: under a second, on a busy machine)
    monkeypatch.setattr(metering, "SLOW_READ_SECONDS", 1.0)
    settings = Settings(data_dir=tmp_path)
    tenants = [
        metering.TenantSources(f"q{i}", "local", ((f"t-q{i}-app-0", "local", None),))
        for i in range(20)
    ]
    reader = _SlowSources(0.0, broken="")
    # When they are read, then no thread is started: a hand-off costs more than the read
    assert len(metering.read_samples(tenants, settings, reader)) == 20
    assert reader.threads == {threading.current_thread().name}


def test_a_chunk_meters_its_active_tenants_once_and_says_what_it_left(
    db: str, tmp_path: Path
) -> None:
    # Given a chunk of an active tenant metered already, an active one with two instances,
    # a suspended one and an id no tenant has
    for tenant_id, status in (("a", TenantStatus.ACTIVE), ("b", TenantStatus.ACTIVE)):
        add_tenant(db, tenant_id, status=status)
    add_tenant(db, "c", status=TenantStatus.SUSPENDED)
    with session_scope(db) as session:
        for tenant_id, n in (("a", 0), ("b", 0), ("b", 1)):
            session.add(
                Instance(
                    tenant_id=tenant_id,
                    name=f"t-{tenant_id}-app-{n}",
                    platform="local",
                    role="app",
                    ordinal=n,
                    status="running",
                    limits={},
                )
            )
    write(db, ["a"], [cpu("a", 2.0, at(61))], window(0))
    settings = Settings(data_dir=tmp_path)

    # When the chunk is metered, and then delivered again
    first = metering.meter_chunk(["d", "c", "b", "a"], window(0), settings, _Sources(), url=db)
    again = metering.meter_chunk(["d", "c", "b", "a"], window(0), settings, _Sources(), url=db)

    # Then b is metered from both its instances, a is left as it was, c and d are skipped
    assert (first.metered, first.already, first.skipped, first.rows) == (
        ["b"],
        ["a"],
        ["c", "d"],
        5,
    )
    assert usage(db, "b")[(at(0), "cpu_seconds")] == 2.0
    assert set(readings(db, "b")) >= {("t-b-app-0", "cpu_seconds"), ("t-b-app-1", "cpu_seconds")}
    assert usage(db, "a")[(at(0), "cpu_seconds")] == 2.0
    # And the second delivery writes nothing
    assert (again.metered, again.already, again.skipped, again.rows) == (
        [],
        ["a", "b"],
        ["c", "d"],
        0,
    )
