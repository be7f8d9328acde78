"""What the ledger costs: a 7-step no-op ledger workflow beside a bare Celery chain of 7 no-ops.

Both run in one process, on the same Redis broker and PostgreSQL database, against
the same real worker (prefork, 2 processes). Also times a real provision workflow
on the local platform. Prints p50/p95/p99 and the ratio; never fails on timing.

    python bench/workflow_overhead.py [--runs 200] [--provisions 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery import Celery, chain  # noqa: E402

from bench._harness import emit, percentiles, pg_database, wait_ready, workers  # noqa: E402

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/3")


def bare_chain(client: Celery, runs: int) -> list[float]:
    samples = []
    for i in range(runs + 5):
        started = time.perf_counter()
        chain(
            *[client.signature("bench.bare_noop", immutable=True) for _ in range(7)]
        ).apply_async().get(timeout=30)
        if i >= 5:  # warm-up
            samples.append((time.perf_counter() - started) * 1000)
    return samples


def ledger_chain(client: Celery, database_url: str, runs: int) -> list[float]:
    from bench.noop import NOOP
    from workers.engine import ledger
    from workers.runtime.db import session_scope
    from workers.runtime.models import WorkflowRun

    samples = []
    for i in range(runs + 5):
        started = time.perf_counter()
        with session_scope(database_url) as session:
            run_id = ledger.new_run(session, kind=NOOP.kind, tenant_id=None, input={}, grace=300).id
        last = ledger.dispatch(client, run_id, "forward", NOOP.forward_tasks)
        assert last is not None
        last.get(timeout=30)  # the last step's result, as the bare chain waits for its last task
        elapsed = (time.perf_counter() - started) * 1000
        with session_scope(database_url) as session:
            status = session.get(WorkflowRun, run_id).status  # type: ignore[union-attr]
        assert status == "succeeded", status
        if i >= 5:
            samples.append(elapsed)
    return samples


def provisions(client: Celery, database_url: str, count: int) -> list[float]:
    from workers.runtime.db import session_scope
    from workers.runtime.models import WorkflowRun

    def wait(run_id: str) -> str:
        while True:
            with session_scope(database_url) as session:
                status = session.get(WorkflowRun, run_id).status  # type: ignore[union-attr]
            if status in ("succeeded", "failed"):
                return status
            time.sleep(0.002)

    samples = []
    for i in range(count):
        tenant = f"bench{i:03d}"
        started = time.perf_counter()
        created = client.send_task(
            "cul8er.tenants.create", kwargs={"name": tenant, "plan": "free", "tenant_id": tenant}
        ).get(timeout=30)
        assert created["ok"], created
        assert wait(created["workflow_id"]) == "succeeded"
        samples.append((time.perf_counter() - started) * 1000)
        gone = client.send_task("cul8er.tenants.deprovision", kwargs={"tenant_id": tenant}).get(
            timeout=30
        )
        assert wait(gone["workflow_id"]) == "succeeded"
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--provisions", type=int, default=20)
    args = parser.parse_args()

    import logging

    import redis

    from workers.runtime.logging import configure_logging

    configure_logging(fmt="console", level="WARNING")
    logging.getLogger().setLevel(logging.WARNING)
    redis.Redis.from_url(REDIS).flushdb()
    with pg_database() as database_url:
        from workers.runtime.migrate import upgrade

        upgrade(database_url)
        env = {
            "CUL8ER_BROKER_URL": REDIS,
            "CUL8ER_DATABASE_URL": database_url,
            "CUL8ER_IMPORTS": '["bench.noop"]',
        }
        client = Celery("bench", broker=REDIS, backend=REDIS)
        client.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_routes={"cul8er.*": {"queue": "lifecycle"}, "bench.*": {"queue": "lifecycle"}},
        )
        with workers(env, concurrency=2):
            wait_ready(client)
            # Interleave so both see the same machine noise.
            bare, led = [], []
            for _ in range(4):
                bare += bare_chain(client, args.runs // 4)
                led += ledger_chain(client, database_url, args.runs // 4)
            b, l_ = percentiles(bare), percentiles(led)
            emit("bare celery chain of 7 no-op tasks (ms)", b)
            emit("ledger workflow of 7 no-op steps (ms)", l_)
            emit(
                "ledger / bare ratio",
                {
                    "p50": round(l_["p50"] / b["p50"], 2),
                    "p99": round(l_["p99"] / b["p99"], 2),
                    "target_p50": 1.5,
                },
            )
            if args.provisions:
                emit(
                    "provision workflow on the local platform, free plan (ms)",
                    percentiles(provisions(client, database_url, args.provisions)),
                )


if __name__ == "__main__":
    main()
