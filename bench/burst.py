"""Signup burst: N ``cul8er.tenants.create`` sent at once, local platform, until all are active.

One real worker (prefork, ``-c 2``) and beat (for the ledger's tick and reconcile) on Redis
(127.0.0.1:6379, db 2, flushed first) and a scratch PostgreSQL database. The bench sends N
creates by task name, as an outside service would, and polls the tenants until every one is
active (or failed). Prints tenants/s from the first send to the last activation, and the
latency from each send to its tenant's activation (p50/p95/p99).

Then the share spent in cul8er against the platform's own work, two ways:

- profile: ``py-spy`` samples both pool processes of the worker during the burst (wall
  time, idle included, so waiting on an instance's boot counts); each sample of a task is
  the platform's when a ``LocalPlatform`` method is on its stack, cul8er's otherwise;
- platform alone: the same N ``create_instance`` calls (the specs the provisioner makes),
  from two processes like the worker's two, with nothing of cul8er around them; cul8er's
  share of the wall time is ``1 - alone / burst``.

    python bench/burst.py [--count 1000] [--no-profile] [--skip-alone]

Never fails on timing. The local platform starts one real process per tenant: 1,000
tenants take about 10 GB of memory while they run; the bench removes them all at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402
from celery import Celery  # noqa: E402

from bench._harness import emit, percentiles, pg_database, wait_ready  # noqa: E402
from bench._procs import Procs, started  # noqa: E402
from bench._profile import Profiler, split_samples  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/2"
#: The ledger's clocks for the burst: the tick sends due waits often, as under ``cul8er up``.
CLOCKS = {
    "CUL8ER_TICK_INTERVAL": "0.5",
    "CUL8ER_RECONCILE_INTERVAL": "5",
    # Room for every tenant's /24 (the default pool holds 256).
    "CUL8ER_NETWORK_POOL": "10.96.0.0/12",
}


def tenant_ids(count: int) -> list[str]:
    """Deterministic tenant ids for a burst of ``count``."""
    return [f"burst{i:05d}" for i in range(count)]


def send_burst(client: Celery, ids: list[str]) -> dict[str, dt.datetime]:
    """Send every create at once; when each went."""
    sent = {}
    for tenant_id in ids:
        client.send_task(
            "cul8er.tenants.create",
            kwargs={"name": tenant_id, "plan": "free", "tenant_id": tenant_id},
        )
        sent[tenant_id] = dt.datetime.now(dt.UTC)
    return sent


def wait_active(database_url: str, count: int, timeout: float) -> dict[str, Any]:
    """Poll until ``count`` tenants are active or failed; their states and activation times."""
    from sqlalchemy import select

    from workers.runtime.db import session_scope
    from workers.runtime.models import Tenant

    deadline = time.monotonic() + timeout
    last_print = time.monotonic()
    while True:
        with session_scope(database_url) as session:
            rows = session.execute(
                select(Tenant.id, Tenant.status, Tenant.updated_at, Tenant.status_reason)
            ).all()
        ended = [r for r in rows if r.status in ("active", "failed")]
        if len(ended) >= count or time.monotonic() > deadline:
            break
        if time.monotonic() - last_print > 15:
            last_print = time.monotonic()
            print(f"  ... {len(ended)}/{count} ended, {len(rows)} created", flush=True)
        time.sleep(0.5)
    return {
        "active": {r.id: r.updated_at for r in rows if r.status == "active"},
        "failed": {r.id: r.status_reason for r in rows if r.status == "failed"},
        "pending": len(rows) - len(ended),
    }


def burst_figures(sent: dict[str, dt.datetime], ended: dict[str, Any]) -> dict[str, Any]:
    """tenants/s and the latency percentiles of one burst."""
    active: dict[str, dt.datetime] = ended["active"]
    first_sent = min(sent.values())
    figures: dict[str, Any] = {
        "sent": len(sent),
        "active": len(active),
        "failed": len(ended["failed"]),
        "not_ended": len(sent) - len(active) - len(ended["failed"]),
    }
    if ended["failed"]:
        figures["first_failure"] = next(iter(ended["failed"].values()))
    if active:
        wall = (max(active.values()) - first_sent).total_seconds()
        figures["wall_s"] = round(wall, 2)
        figures["tenants_per_s"] = round(len(active) / wall, 2)
        latencies = [(active[t] - sent[t]).total_seconds() * 1000 for t in active]
        figures["latency_ms"] = percentiles(latencies)
    return figures


def worker_events(data: Path) -> dict[str, int]:
    """What the worker logged besides the work: runs reconcile resumed, steps taken over."""
    import json

    counts = {"runs_resumed_by_reconcile": 0, "steps_taken_over": 0, "step_ownership_lost": 0}
    log = data / "worker.log"
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            event = entry.get("event")
            if event == "workflows_resumed":
                counts["runs_resumed_by_reconcile"] += int(entry.get("count", 0))
            elif event == "step_taken_over":
                counts["steps_taken_over"] += 1
            elif event == "step_ownership_lost":
                counts["step_ownership_lost"] += 1
    return counts


@contextlib.contextmanager
def burst_stack(data: Path, with_profile: bool) -> Iterator[tuple[Celery, str, Procs, Profiler]]:
    """Redis + scratch PostgreSQL + worker + beat; the client, database URL and processes."""
    from workers.runtime.migrate import upgrade

    redis.Redis.from_url(REDIS_URL).flushdb()
    with pg_database() as database_url:
        upgrade(database_url)
        env = {"CUL8ER_BROKER_URL": REDIS_URL, "CUL8ER_DATABASE_URL": database_url, **CLOCKS}
        client = Celery("burst", broker=REDIS_URL, backend=REDIS_URL)
        client.conf.update(task_serializer="json", accept_content=["json"])
        try:
            with started(data, env, concurrency=2, beat=True) as procs:
                wait_ready(client)
                profiler = Profiler(procs.worker_pid, data / "profile", enabled=with_profile)
                yield client, database_url, procs, profiler
        finally:
            client.close()
            remove_instances(data / "instances")


def remove_instances(state_dir: Path) -> int:
    """Kill every instance process of ``state_dir`` at once, then remove their folders."""
    import signal

    import psutil

    from plugins.platforms.local import STATE_ENV, LocalPlatform

    killed = 0
    for proc in psutil.process_iter(["environ"]):
        if (proc.info.get("environ") or {}).get(STATE_ENV) == str(state_dir.resolve()):
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
                killed += 1
    if state_dir.is_dir():
        platform = LocalPlatform(state_dir=state_dir)
        for folder in state_dir.iterdir():
            if folder.is_dir():
                # Nothing is left to kill: this removes the cgroups and the folder.
                platform.destroy_instance(folder.name)
    return killed


def run_burst(count: int, with_profile: bool, timeout: float) -> dict[str, Any]:
    """One burst of ``count`` creates; its figures and (if profiled) the profile's split."""
    data = Path(tempfile.mkdtemp(prefix="cul8er-burst-"))
    with burst_stack(data, with_profile) as (client, database_url, _procs, profiler):
        ids = tenant_ids(count)
        with profiler:
            sent = send_burst(client, ids)
            ended = wait_active(database_url, count, timeout)
        figures = {**burst_figures(sent, ended), **worker_events(data)}
        emit(f"signup burst: {count} tenants.create at once, local platform, -c 2", figures)
        split = split_samples(profiler.outputs) if with_profile else {}
    return {**figures, "profile": split}


def create_alone(state_dir: str, names: list[str]) -> list[float]:
    """Create the instances ``names`` (free plan, as the provisioner would); ms per create."""
    from workers.economics.plans import get_plan
    from workers.engine.instances import instance_spec
    from workers.pluginhost.handles import get_platform
    from workers.runtime.logging import configure_logging
    from workers.runtime.settings import Settings

    configure_logging(fmt="console", level="WARNING")
    settings = Settings(data_dir=Path(state_dir))
    platform = get_platform("local", settings)
    plan = get_plan("free", None)
    samples = []
    for name in names:
        tenant_id = name.removeprefix("t-").removesuffix("-app-0")
        spec = instance_spec(tenant_id, plan, "local", 0, port=settings.instance_port)
        started_at = time.perf_counter()
        platform.create_instance(spec)
        samples.append((time.perf_counter() - started_at) * 1000)
    return samples


def platform_alone(count: int, processes: int = 2) -> dict[str, Any]:
    """The platform's own create for ``count`` tenants from ``processes`` processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    data = Path(tempfile.mkdtemp(prefix="cul8er-alone-"))
    names = [f"t-{t}-app-0" for t in tenant_ids(count)]
    shares = [names[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            started_at = time.perf_counter()
            done = list(pool.map(create_alone, [str(data)] * processes, shares))
            wall = time.perf_counter() - started_at
    finally:
        remove_instances(data / "instances")
    samples = [ms for part in done for ms in part]
    return {
        "count": count,
        "processes": processes,
        "wall_s": round(wall, 2),
        "creates_per_s": round(count / wall, 2),
        "create_ms": percentiles(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--skip-alone", action="store_true")
    args = parser.parse_args()

    import logging

    from workers.runtime.logging import configure_logging

    configure_logging(fmt="console", level="WARNING")
    logging.getLogger().setLevel(logging.WARNING)
    burst = run_burst(args.count, not args.no_profile, args.timeout)
    if burst["profile"]:
        emit("profile of the worker's pool processes during the burst", burst["profile"])
    if args.skip_alone or "wall_s" not in burst or burst["not_ended"]:
        # An unfinished burst has no wall time to set the platform's against.
        return
    alone = platform_alone(args.count)
    emit("the platform alone: create_instance from 2 processes, no cul8er", alone)
    emit(
        "share of the burst's wall time",
        {
            "burst_wall_s": burst["wall_s"],
            "platform_alone_wall_s": alone["wall_s"],
            "cul8er_share_wall": round(1 - alone["wall_s"] / burst["wall_s"], 3),
            "cul8er_share_profile": burst["profile"].get("cul8er_share_of_task_time"),
            "goal": 0.10,
        },
    )


if __name__ == "__main__":
    main()
