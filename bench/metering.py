"""Metering throughput: full metering ticks of 10,000 tenants on PostgreSQL, beside a bare fan-out.

A real worker (prefork, 2 processes) on Redis and PostgreSQL meters every active tenant:
``cul8er.metering.meter_all`` claims its slot and sends one ``meter_tenants`` message per
chunk; each chunk reads its tenants' instances, reads every instance's counters from the
platform, and writes five usage rows per tenant plus the new readings in one transaction.
The platform is a stand-in plugin (``benchcounters``, built from cul8er's plugin template)
whose ``stats`` returns counters that grow with time, without a container behind them; its
instances have no endpoint, so no request counter is read over HTTP.

The baseline, timed in the same run on the same worker, is a bare Celery fan-out: a task
that reads the active tenant ids and sends the same chunks to a task that does nothing.

    python bench/metering.py [--tenants 10000] [--chunk 100] [--ticks 3] [--interval 20]
                             [--billing-windows 100] [--docker-tenants 200] [--docker-sample 20]

Then the billing close: every tenant's anchor moves 40 days back (half of them upgrade from
starter to pro mid-period), 5 x 100 usage rows per tenant (5 million for 10,000 tenants)
are written inside that month, and closing every tenant's month is timed.

Then the Docker platform (``--docker-tenants``, 0 skips it): that many tenants with one
container each (``cul8er/instance``, ports on 127.0.0.1 only, removed afterwards). First
the counters are read in this process through the platform: one by one from the engine's
``stats`` (a sample of ``--docker-sample`` containers, whose p50 gives the one-by-one
tick), all of them at once from the engine, and all of them from this host's cgroup files.
Then a full tick of those tenants on a worker, as above. Their instances have no endpoint:
no request counter is read over HTTP.

Each figure is printed beside its goal (``GOALS``) and the ratio to it.

A tick's time runs from sending ``meter_all`` to the last chunk's commit (the latest
``recorded_at`` of its window); the target is a 10,000-tenant tick well inside the 60 s
interval. Prints figures; never fails on timing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: A Redis URL to use; unset, the bench runs its own Redis server (cul8er's embedded one), so
#: no other process on the machine can take its messages.
REDIS = os.environ.get("BENCH_REDIS_URL")
PLUGIN = "benchcounters"
#: The goals (seconds): a warm 10,000-tenant tick, the 10,000-tenant close, a Docker tick.
GOALS = {"tick": 2.0, "close": 5.0, "docker_tick": 10.0}
#: The image of the Docker containers (tiny, built by scripts/platforms-up.sh).
DOCKER_IMAGE = "cul8er/instance:latest"
#: Containers created or removed at once.
DOCKER_THREADS = 8

#: The stand-in platform's ``stats``: counters that grow at a rate of each instance's own.
STATS = '''
    def stats(self, name: str) -> InstanceStats:
        """Counters growing with time at a rate of the name's own; no container behind them."""
        rate = 1 + zlib.crc32(name.encode()) % 100 / 100
        alive = time.time() - EPOCH
        return InstanceStats(
            cpu_seconds=alive * rate / 100,
            memory_bytes=int(64_000_000 * rate + alive % 60 * 1000),
            disk_bytes=int(10_000_000 * rate),
            rx_bytes=int(alive * rate * 1000),
            tx_bytes=int(alive * rate * 4000),
        )
'''


if __name__ != "__main__":
    # Imported by the worker (CUL8ER_IMPORTS): the bare fan-out's two tasks.
    from workers.economics.metering import active_tenant_ids, chunked
    from workers.runtime.app import app
    from workers.runtime.db import session_scope
    from workers.runtime.settings import get_settings

    @app.task(name="bench.metering.bare_all", acks_late=True, ignore_result=True)
    def bare_all(task_ids: list[str], window_start: str, window_end: str) -> None:
        """What ``meter_all`` does to fan out, sending each chunk to a task doing nothing."""
        with session_scope() as session:
            tenant_ids = active_tenant_ids(session)
        chunks = chunked(tenant_ids, get_settings().meter_chunk_size)
        with app.producer_or_acquire() as producer:
            for task_id, chunk in zip(task_ids, chunks, strict=False):
                bare_chunk.apply_async(
                    kwargs={
                        "tenant_ids": chunk,
                        "window_start": window_start,
                        "window_end": window_end,
                    },
                    task_id=task_id,
                    queue="metering",
                    producer=producer,
                )

    @app.task(name="bench.metering.bare_chunk", acks_late=True)
    def bare_chunk(tenant_ids: list[str], window_start: str, window_end: str) -> float:
        """A chunk message that does nothing; answers when it ran."""
        return time.time()


def make_plugin(parent: Path) -> Path:
    """The stand-in platform plugin under ``parent``; returns the folder for the plugin path."""
    from schemas.manifest import PluginType
    from workers.pluginhost.template import write_manifest, write_plugin

    project = write_plugin(parent, name=PLUGIN, plugin_type=PluginType.PLATFORM, trusted=True)
    root = project / f"cul8er_{PLUGIN}"
    module = root / "__init__.py"
    source = module.read_text()
    start = source.index("    def stats(self, name: str) -> InstanceStats:")
    end = source.index("    def set_limits(")
    # Counters start near zero when the bench starts, like a fresh instance's.
    stats = STATS.lstrip("\n").replace("EPOCH", str(int(time.time())))
    source = source[:start] + stats + "\n" + source[end:]
    source = source.replace(
        "from typing import Any\n", "import time\nimport zlib\nfrom typing import Any\n"
    )
    module.write_text(source)
    write_manifest(
        root,
        name=PLUGIN,
        plugin_type=PluginType.PLATFORM,
        module=f"cul8er_{PLUGIN}",
        trusted=True,
    )
    return project


def seed(database_url: str, tenants: int, *, platform: str = PLUGIN, prefix: str = "b") -> None:
    """``tenants`` active tenants (``<prefix>00000``...), one instance each on ``platform``."""
    from sqlalchemy import insert

    from schemas.states import TenantStatus
    from workers.runtime.db import session_scope
    from workers.runtime.models import Instance, Tenant, utcnow

    now = utcnow()
    ids = [f"{prefix}{i:05d}" for i in range(tenants)]
    with session_scope(database_url) as session:
        session.execute(
            insert(Tenant),
            [
                {
                    "id": t,
                    "name": t,
                    "plan": "free",
                    "status": TenantStatus.ACTIVE,
                    "platform": platform,
                    "placement": None,
                    "resources": {},
                    "meta": {},
                    "billing_anchor": now.date(),
                    "generation": 1,
                    "created_at": now,
                    "updated_at": now,
                }
                for t in ids
            ],
        )
        session.execute(
            insert(Instance),
            [
                {
                    "tenant_id": t,
                    "name": f"t-{t}-app-0",
                    "platform": platform,
                    "role": "app",
                    "ordinal": 0,
                    "status": "running",
                    "endpoint": None,
                    "limits": {},
                    "created_at": now,
                    "updated_at": now,
                }
                for t in ids
            ],
        )


#: Usage rows per tenant for the billing close: 5 metrics x this many windows.
BILLING_WINDOWS = 100


def seed_billing(database_url: str, windows: int) -> tuple[int, dt.datetime]:
    """Move every tenant's billing anchor 40 days back, switch half of them from starter to
    pro mid-period, and write ``5 x windows`` usage rows per tenant inside that period.

    Returns the number of usage rows and the period's start.
    """
    from sqlalchemy import text

    from workers.runtime.db import session_scope
    from workers.runtime.models import utcnow

    today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    start = today - dt.timedelta(days=40)
    middle = start + dt.timedelta(days=15)
    naive = {"start": start.replace(tzinfo=None), "middle": middle.replace(tzinfo=None)}
    with session_scope(database_url) as session:
        session.execute(text("UPDATE tenants SET billing_anchor = CAST(:start AS date)"), naive)
        session.execute(
            text(
                "INSERT INTO plan_periods (tenant_id, plan, start_at, end_at) "
                "SELECT id, 'starter', :start, "
                "CASE WHEN right(id, 1) IN ('0','2','4','6','8') THEN :middle END FROM tenants"
            ),
            naive,
        )
        session.execute(
            text(
                "INSERT INTO plan_periods (tenant_id, plan, start_at, end_at) "
                "SELECT id, 'pro', :middle, NULL FROM tenants "
                "WHERE right(id, 1) IN ('0','2','4','6','8')"
            ),
            naive,
        )
        # Six-hour windows across the period, five metrics each, written set-based.
        session.execute(
            text(
                "INSERT INTO usage_records "
                "(tenant_id, metric, window_start, window_end, value, aggregation, recorded_at) "
                "SELECT t.id, m.metric, "
                "  :start + w * interval '6 hours', :start + (w + 1) * interval '6 hours', "
                "  m.scale * random(), m.agg, :start + (w + 1) * interval '6 hours' "
                "FROM tenants t "
                "CROSS JOIN (VALUES ('cpu_seconds', 'sum', 2000.0), ('requests', 'sum', 5000.0), "
                "  ('bandwidth_bytes', 'sum', 1e8), ('storage_bytes', 'max', 2e10), "
                "  ('memory_bytes', 'avg', 1e9)) AS m(metric, agg, scale) "
                "CROSS JOIN generate_series(0, :last) AS w"
            ),
            {**naive, "last": windows - 1},
        )
        session.execute(text("ANALYZE usage_records"))
        rows = session.execute(text("SELECT count(*) FROM usage_records")).scalar_one()
    return int(rows), start


def billing_close(database_url: str, tenants: int, windows: int) -> None:
    """Time closing every tenant's ended month over the usage written by ``seed_billing``."""
    from bench._harness import emit
    from workers.economics.billing import close_periods

    started = time.perf_counter()
    rows, start = seed_billing(database_url, windows)
    seeded = time.perf_counter() - started
    started = time.perf_counter()
    summary = close_periods(url=database_url, period="month")
    closed = time.perf_counter() - started
    emit(
        f"billing close of {tenants} tenants' month over {rows} usage rows (PostgreSQL)",
        {
            "usage_rows": rows,
            "seed_seconds": round(seeded, 1),
            "period_start": start.date().isoformat(),
            "close_seconds": round(closed, 2),
            "invoices": len(summary.inserted),
            "periods_seen": summary.periods,
            "tenants_per_s": round(tenants / closed, 1),
            "goal_seconds": GOALS["close"],
            "close_over_goal": round(closed / GOALS["close"], 2),
        },
    )


def next_slot(interval: int) -> dt.datetime:
    """Sleep until just after the next slot starts; returns that slot's start."""
    now = time.time()
    start = now - now % interval + interval
    time.sleep(start - now + 0.05)
    return dt.datetime.fromtimestamp(start, tz=dt.UTC)


def bare_fanout(client: Any, tenants: int, chunk: int) -> float:
    """Seconds from sending the bare fan-out to its last chunk having run."""
    from celery.result import AsyncResult, ResultSet

    ids = [uuid.uuid4().hex for _ in range(math.ceil(tenants / chunk))]
    started = time.time()
    client.send_task(
        "bench.metering.bare_all",
        kwargs={"task_ids": ids, "window_start": "", "window_end": ""},
        queue="metering",
    )
    ran = ResultSet([AsyncResult(i, app=client) for i in ids]).join(timeout=300)
    for i in ids:
        AsyncResult(i, app=client).forget()
    return max(ran) - started


def metering_tick(client: Any, database_url: str, tenants: int, interval: int) -> float:
    """Seconds from sending ``meter_all`` at a slot's start to its last chunk's commit."""
    from sqlalchemy import func, select

    from workers.runtime.db import session_scope
    from workers.runtime.models import UsageRecord

    slot = next_slot(interval)
    window_start = slot - dt.timedelta(seconds=interval)
    started = time.time()
    client.send_task("cul8er.metering.meter_all", queue="metering")
    where = (UsageRecord.window_start == window_start, UsageRecord.metric == "cpu_seconds")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.5)
        with session_scope(database_url) as session:
            done, last = session.execute(
                select(func.count(), func.max(UsageRecord.recorded_at)).where(*where)
            ).one()
        if done >= tenants:
            return float(last.timestamp() - started)
    raise RuntimeError(f"the tick metered {done} of {tenants} tenants in 600 s")


@contextlib.contextmanager
def broker() -> Iterator[str]:
    """``BENCH_REDIS_URL`` (flushed), else a Redis server of the bench's own."""
    if REDIS:
        import redis

        redis.Redis.from_url(REDIS).flushdb()
        yield REDIS
        return
    from workers.runtime.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory() as folder, EmbeddedRedis(Path(folder)).start() as server:
        yield server.url


def parse_args() -> argparse.Namespace:
    """The bench's options (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--interval", type=int, default=20, help="metering slot length (s)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--docker-tenants",
        type=int,
        default=200,
        help="tenants with one Docker container each for the Docker tick (0 skips it)",
    )
    parser.add_argument(
        "--docker-sample",
        type=int,
        default=20,
        help="containers read one by one from the engine, for the one-by-one estimate",
    )
    parser.add_argument(
        "--billing-windows",
        type=int,
        default=BILLING_WINDOWS,
        help="usage windows per tenant for the billing close (x5 metrics; 0 skips it)",
    )
    return parser.parse_args()


def time_ticks(client: Any, database_url: str, args: argparse.Namespace) -> None:
    """Time ``args.ticks`` metering ticks and as many bare fan-outs, interleaved; print both."""
    from bench._harness import emit

    bare_s: list[float] = []
    tick_s: list[float] = []
    # Interleaved, so both see the same machine noise.
    for _ in range(args.ticks):
        bare_s.append(bare_fanout(client, args.tenants, args.chunk))
        tick_s.append(metering_tick(client, database_url, args.tenants, args.interval))
    warm = tick_s[1:] or tick_s  # the first tick inserts every reading; later update
    best_bare = min(bare_s)
    emit(
        f"metering tick of {args.tenants} tenants on PostgreSQL "
        f"({args.concurrency} worker processes, chunks of {args.chunk})",
        {
            "tick_seconds": [round(s, 2) for s in tick_s],
            "first_tick_tenants_per_s": round(args.tenants / tick_s[0], 1),
            "warm_tick_seconds_median": round(sorted(warm)[len(warm) // 2], 2),
            "warm_tenants_per_s": round(args.tenants / min(warm), 1),
            "goal_seconds": GOALS["tick"],
            "warm_median_over_goal": round(sorted(warm)[len(warm) // 2] / GOALS["tick"], 2),
        },
    )
    emit(
        "bare celery fan-out of the same chunks (no-op tasks)",
        {
            "seconds": [round(s, 2) for s in bare_s],
            "tenants_per_s": round(args.tenants / best_bare, 1),
        },
    )
    emit(
        "metering / bare fan-out ratio",
        {
            "warm_tick_over_best_bare": round(min(warm) / best_bare, 2),
            "first_tick_over_best_bare": round(tick_s[0] / best_bare, 2),
            # Each tick beside the fan-out just before it: the same machine noise.
            "tick_over_bare_pairwise": [
                round(t / b, 2) for t, b in zip(tick_s, bare_s, strict=True)
            ],
        },
    )
    print(
        "(the bare fan-out's chunks do nothing: the ratio is what reading counters "
        "and writing five rows and the readings per tenant costs on top of Celery)"
    )


# -- the Docker platform ----------------------------------------------------------------------


@contextlib.contextmanager
def docker_containers(names: list[str]) -> Iterator[None]:
    """A running container per name (loopback ports only), all removed afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    import docker

    client = docker.from_env(timeout=120)

    def create(name: str) -> None:
        client.containers.run(
            DOCKER_IMAGE,
            name=name,
            detach=True,
            init=True,
            labels={"cul8er.managed": "true", "cul8er.tenant": name.split("-")[1]},
            ports={"8080/tcp": ("127.0.0.1", None)},
        )

    def remove(name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container(name, force=True, v=True)

    try:
        with ThreadPoolExecutor(DOCKER_THREADS) as pool:
            list(pool.map(remove, names))  # left over by a bench that was killed
            list(pool.map(create, names))
        yield
    finally:
        with ThreadPoolExecutor(DOCKER_THREADS) as pool:
            list(pool.map(remove, names))
        client.close()


class _DirectReader:
    """Metering's source reader over one platform object, in this process (no plugin host)."""

    def __init__(self, platform: Any) -> None:
        self.platform = platform

    def instance_stats(self, platform: str, instance: str) -> Any:
        return self.platform.stats(instance)

    def provisioner_usage(self, provisioner: str, tenant_id: str) -> dict[str, float]:
        raise NotImplementedError

    def entry_requests(self, tenant_id: str) -> float:
        raise NotImplementedError


def docker_reads(ids: list[str], sample: int) -> dict[str, Any]:
    """Seconds to read the containers' counters: one by one from the engine (a sample),
    all at once from the engine, all from the cgroup files, as metering reads them."""
    from bench._harness import percentiles
    from plugins.platforms.docker import DockerPlatform
    from workers.economics.metering import TenantSources, read_samples
    from workers.runtime.settings import get_settings

    engine = DockerPlatform(base_url=None, image=DOCKER_IMAGE, read_cgroups=False)
    files = DockerPlatform(base_url=None, image=DOCKER_IMAGE)
    names = [f"t-{t}-app-0" for t in ids]
    engine.stats(names[0])  # each client connects once, before the timings
    files.stats(names[0])
    one_ms = []
    for name in names[:sample]:
        started = time.perf_counter()
        engine.stats(name)
        one_ms.append((time.perf_counter() - started) * 1000)
    sources = [
        TenantSources(t, "docker", instances=((f"t-{t}-app-0", "docker", None),)) for t in ids
    ]
    figures: dict[str, Any] = {"engine_stats_ms": percentiles(one_ms)}
    figures["one_by_one_tick_estimate_s"] = round(
        figures["engine_stats_ms"]["p50"] * len(ids) / 1000, 1
    )
    for label, platform in (("engine_at_once", engine), ("cgroup_files", files)):
        started = time.perf_counter()
        read = read_samples(sources, get_settings(), _DirectReader(platform))
        figures[f"{label}_s"] = round(time.perf_counter() - started, 2)
        figures[f"{label}_samples"] = len(read)
    return figures


def docker_bench(args: argparse.Namespace) -> None:
    """The Docker platform's reads, then a full tick of its tenants on a worker."""
    from celery import Celery

    from bench._harness import emit, pg_database, wait_ready, workers
    from workers.runtime.migrate import upgrade

    ids = [f"bd{i:05d}" for i in range(args.docker_tenants)]
    started = time.perf_counter()
    with docker_containers([f"t-{t}-app-0" for t in ids]):
        made = time.perf_counter() - started
        reads = docker_reads(ids, args.docker_sample)
        with pg_database() as database_url, broker() as broker_url:
            upgrade(database_url)
            seed(database_url, len(ids), platform="docker", prefix="bd")
            env = {
                "CUL8ER_BROKER_URL": broker_url,
                "CUL8ER_DATABASE_URL": database_url,
                "CUL8ER_IMPORTS": '["tasks.metering"]',
                "CUL8ER_METER_INTERVAL": str(args.interval),
                "CUL8ER_METER_CHUNK_SIZE": str(args.chunk),
            }
            client = Celery("bench", broker=broker_url, backend=broker_url)
            client.conf.update(task_serializer="json", accept_content=["json"])
            with workers(env, concurrency=args.concurrency):
                wait_ready(client)
                ticks = [
                    metering_tick(client, database_url, len(ids), args.interval) for _ in range(2)
                ]
    emit(
        f"metering tick of {len(ids)} tenants on the Docker platform, one container each "
        f"({args.concurrency} worker processes, chunks of {args.chunk})",
        {
            "containers_made_s": round(made, 1),
            **reads,
            "tick_seconds": [round(t, 2) for t in ticks],
            "goal_seconds": GOALS["docker_tick"],
            "tick_over_goal": round(max(ticks) / GOALS["docker_tick"], 2),
        },
    )


def main() -> None:
    args = parse_args()

    import logging

    from celery import Celery

    from bench._harness import pg_database, wait_ready, workers
    from workers.runtime.logging import configure_logging

    configure_logging(fmt="console", level="WARNING")
    logging.getLogger().setLevel(logging.WARNING)
    with (
        pg_database() as database_url,
        tempfile.TemporaryDirectory() as plugins,
        broker() as broker_url,
    ):
        from workers.runtime.migrate import upgrade

        upgrade(database_url)
        plugin_path = make_plugin(Path(plugins))
        seeded = time.perf_counter()
        seed(database_url, args.tenants)
        print(f"seeded {args.tenants} tenants in {time.perf_counter() - seeded:.1f} s")
        env = {
            "CUL8ER_BROKER_URL": broker_url,
            "CUL8ER_DATABASE_URL": database_url,
            "CUL8ER_IMPORTS": '["tasks.metering", "bench.metering"]',
            "CUL8ER_PLUGIN_PATH": str(plugin_path),
            "CUL8ER_METER_INTERVAL": str(args.interval),
            "CUL8ER_METER_CHUNK_SIZE": str(args.chunk),
        }
        client = Celery("bench", broker=broker_url, backend=broker_url)
        client.conf.update(task_serializer="json", accept_content=["json"])
        with workers(env, concurrency=args.concurrency):
            wait_ready(client)
            time_ticks(client, database_url, args)
        if args.billing_windows:
            # The close itself is one set-based pass per chunk of tenants; it runs here, in
            # the bench process, as the beat-scheduled task runs it on a worker.
            billing_close(database_url, args.tenants, args.billing_windows)
    if args.docker_tenants:
        docker_bench(args)


if __name__ == "__main__":
    main()
