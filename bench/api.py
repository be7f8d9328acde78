"""What the HTTP API adds to a public task, measured side by side in one run on a real stack.

    python bench/api.py [--calls 300] [--concurrency 8]

One stack: Redis broker and result backend, a fresh PostgreSQL database, one ``celery
worker`` (4 processes, every cul8er queue) and ``cul8er api serve`` on a loopback port with
rate limits out of the way (1000000/minute). Each operation is measured two ways:

- **GET /api/v1/tenants/{id}** (httpx, admin bearer token) against
  ``send_task("cul8er.tenants.get", ...).get()`` from a plain Celery client;
- **POST /api/v1/tenants** (to its ``202``, a unique name per call, no idempotency key)
  against ``send_task("cul8er.tenants.create", ...).get()``;
- the baseline: a bare Celery no-op round trip (``bench.bare_noop``).

First ``--calls`` calls of each by one caller, the five operations interleaved call by call
so that drift hits them alike; then ``--calls`` calls of each by ``--concurrency`` threads
(one httpx.Client or one Celery client per thread) for throughput. Printed: p50/p95/p99,
calls per second, the ratio API/send_task at p50 and the difference in ms (the bar: the API
adds no more than a few milliseconds at p50). Figures are printed, never asserted.

Sign-ups: a create records the tenant, its plan period, the workflow run and its steps, then
sends the run's first step to the broker. The API routes public tasks to the ``lifecycle``
queue, where the steps travel too, so the worker must consume it. To keep hundreds of
provisions (instance processes, a database each) from running beside the measurement, the
worker imports this module, which routes the provision workflow's first step, in that worker
only, to a queue no worker consumes: every create does all of its work, its message is
published and then left there. Nothing is provisioned; the queue, the worker, the server and
the database are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: The queue a bench worker sends a sign-up's first provisioning step to (nobody consumes it).
PARKED = "bench.parked"
#: Set in the stack's environment: a worker importing this module parks provisioning.
PARK_ENV = "BENCH_API_PARKED_QUEUE"


def _park_provisioning(queue: str) -> None:
    """In this worker: the provision workflow's first step goes to ``queue``."""
    from celery.app.routes import MapRoute

    from tasks.workflows import PROVISION
    from workers.runtime.app import app

    # Before the pool forks (task modules are imported first): every child inherits it.
    app.amqp.router.routes.insert(0, MapRoute({PROVISION.forward_tasks[0]: {"queue": queue}}))


if __name__ != "__main__" and os.environ.get(PARK_ENV):
    _park_provisioning(os.environ[PARK_ENV])


import httpx  # noqa: E402
import redis  # noqa: E402
from celery import Celery  # noqa: E402

from bench._harness import emit, percentiles  # noqa: E402
from bench.rollback import bare_round_trips  # noqa: E402
from tests.conftest import build_stack, teardown_stack  # noqa: E402
from tests.integration.test_api import SECRET, client, serve  # noqa: E402
from tests.stack import Stack, instance_processes  # noqa: E402
from workers.api.roles import Role  # noqa: E402

WORKER_PROCESSES = 4
WARM_UP = 20
READ_TENANT = "bench-read"
RATE = "1000000/minute"
SETUP = (
    "worker consumes lifecycle,metering,health,celery; in it the provision workflow's first "
    f"step is routed to {PARKED!r}, which no worker consumes: every create runs in full and "
    "publishes that step, nothing is provisioned"
)

#: One call: a caller's resource (httpx.Client or Celery app) and a call number → None.
Call = Callable[[Any, int], None]


# -- the calls --------------------------------------------------------------------------------


def plain_celery(stack: Stack) -> Celery:
    """A plain Celery client of the stack's broker, as ``Stack.client`` builds one."""
    assert stack.broker_url is not None
    app = Celery("client", broker=stack.broker_url, backend=stack.broker_url)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    return app


def _name(kind: str, i: int) -> str:
    # A unique name per call; the tenant id is derived from it.
    return f"bench {kind} {i} {uuid.uuid4().hex[:10]}"


def bare(app: Celery, _i: int) -> None:
    app.send_task("bench.bare_noop").get(timeout=30)


def task_get(app: Celery, _i: int) -> None:
    answer = app.send_task("cul8er.tenants.get", kwargs={"tenant_id": READ_TENANT}).get(timeout=30)
    if not answer.get("ok"):
        raise RuntimeError(answer)


def api_get(http: httpx.Client, _i: int) -> None:
    answer = http.get(f"/tenants/{READ_TENANT}")
    if answer.status_code != 200:
        raise RuntimeError(f"GET answered {answer.status_code}: {answer.text}")


def task_create(app: Celery, i: int) -> None:
    kwargs = {"name": _name("task", i), "plan": "free"}
    answer = app.send_task("cul8er.tenants.create", kwargs=kwargs).get(timeout=30)
    if not answer.get("ok"):
        raise RuntimeError(answer)


def api_create(http: httpx.Client, i: int) -> None:
    answer = http.post("/tenants", json={"name": _name("api", i), "plan": "free"})
    if answer.status_code != 202:
        raise RuntimeError(f"POST answered {answer.status_code}: {answer.text}")


#: name → (which client it uses, the call); the order of the tables.
OPERATIONS: dict[str, tuple[str, Call]] = {
    "bare celery no-op": ("celery", bare),
    "GET tenant, send_task": ("celery", task_get),
    "GET tenant, API": ("http", api_get),
    "POST tenant, send_task": ("celery", task_create),
    "POST tenant, API (202)": ("http", api_create),
}
PAIRS = {
    "GET /api/v1/tenants/{id}": ("GET tenant, API", "GET tenant, send_task"),
    "POST /api/v1/tenants": ("POST tenant, API (202)", "POST tenant, send_task"),
}


@contextlib.contextmanager
def callers(stack: Stack, base: str) -> Iterator[dict[str, Any]]:
    """One httpx.Client and one plain Celery client, closed afterwards."""
    http = client(base, Role.ADMIN)
    app = plain_celery(stack)
    try:
        yield {"http": http, "celery": app}
    finally:
        http.close()
        app.close()


# -- the two phases ---------------------------------------------------------------------------


def sequential(stack: Stack, base: str, calls: int) -> dict[str, list[float]]:
    """``calls`` of each operation by one caller, interleaved call by call (ms)."""
    samples: dict[str, list[float]] = {name: [] for name in OPERATIONS}
    with callers(stack, base) as mine:
        for i in range(-WARM_UP, calls):
            for name, (kind, call) in OPERATIONS.items():
                if name == "bare celery no-op":
                    # The baseline the other benches print, through the stack's own client.
                    took = bare_round_trips(stack, 1)[0]
                else:
                    started = time.perf_counter()
                    call(mine[kind], i)
                    took = (time.perf_counter() - started) * 1000
                if i >= 0:
                    samples[name].append(took)
    return samples


def concurrent(
    stack: Stack, base: str, name: str, calls: int, threads: int
) -> tuple[list[float], float]:
    """``calls`` of one operation by ``threads`` callers; latencies (ms) and wall seconds."""
    kind, call = OPERATIONS[name]
    samples: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    issued = iter(range(calls))
    ready = threading.Barrier(threads + 1)
    done: list[float] = []

    def run(worker: int) -> None:
        with callers(stack, base) as mine:
            try:
                for w in range(WARM_UP // 4):
                    call(mine[kind], -1 - w - worker * WARM_UP)
            except BaseException as exc:  # noqa: BLE001 - reported after the join
                errors.append(exc)
            ready.wait()
            mine_ms: list[float] = []
            while not errors:
                with lock:
                    i = next(issued, None)
                if i is None:
                    break
                started = time.perf_counter()
                try:
                    call(mine[kind], i)
                except BaseException as exc:  # noqa: BLE001 - reported after the join
                    errors.append(exc)
                    break
                mine_ms.append((time.perf_counter() - started) * 1000)
            finished = time.perf_counter()
            with lock:
                samples.extend(mine_ms)
                done.append(finished)

    pool = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(threads)]
    for thread in pool:
        thread.start()
    ready.wait()
    began = time.perf_counter()
    for thread in pool:
        thread.join()
    if errors:
        raise RuntimeError(f"{name}: {errors[0]!r}") from errors[0]
    return samples, max(done) - began


# -- the stack --------------------------------------------------------------------------------


def parked_messages(stack: Stack) -> int:
    assert stack.broker_url is not None
    with redis.Redis.from_url(stack.broker_url) as r:
        return int(r.llen(PARKED))


def drop_parked(stack: Stack) -> None:
    """Remove the parked queue (and kombu's binding of it) from the stack's Redis db."""
    if stack.broker_url is None:
        return
    with redis.Redis.from_url(stack.broker_url) as r:
        r.delete(PARKED, f"_kombu.binding.{PARKED}")


def start(stack: Stack) -> None:
    """Configure the stack, add the tenant the reads read, start the worker."""
    stack.extra_env.update(
        {
            "CUL8ER_IMPORTS": '["bench.noop", "bench.api"]',
            "CUL8ER_LOG_LEVEL": "WARNING",
            "CUL8ER_API_JWT_SECRET": SECRET,
            "CUL8ER_API_RATE_READ": RATE,
            "CUL8ER_API_RATE_WRITE": RATE,
            PARK_ENV: PARKED,
        }
    )
    stack.add_tenant(READ_TENANT, "Bench Read")
    stack.start_worker("bench", concurrency=WORKER_PROCESSES)


# -- output -----------------------------------------------------------------------------------


def _row(name: str, figures: dict[str, Any]) -> str:
    rate = figures.get("calls_per_s", "")
    return (
        f"{name:<24} {figures['n']:>8} {figures['p50']:>8} {figures['p95']:>8} "
        f"{figures['p99']:>8} {figures['mean']:>8} {rate!s:>9}"
    )


def table(title: str, figures: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}")
    head = ("n", "p50", "p95", "p99", "mean")
    print(f"{'operation (ms)':<24} " + " ".join(f"{h:>8}" for h in head) + f" {'calls/s':>9}")
    for name, row in figures.items():
        print(_row(name, row))


def comparison(figures: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per endpoint: API against send_task (ratio at p50, differences in ms) and bare."""
    base = figures["bare celery no-op"]
    out: dict[str, dict[str, Any]] = {}
    for endpoint, (api, task) in PAIRS.items():
        a, t = figures[api], figures[task]
        row: dict[str, Any] = {
            "p50_ratio_api_to_send_task": round(a["p50"] / t["p50"], 2),
            "p50_added_ms": round(a["p50"] - t["p50"], 2),
            "p95_added_ms": round(a["p95"] - t["p95"], 2),
            "p99_added_ms": round(a["p99"] - t["p99"], 2),
            "p50_ratio_send_task_to_bare": round(t["p50"] / base["p50"], 2),
            "p50_ratio_api_to_bare": round(a["p50"] / base["p50"], 2),
        }
        if "calls_per_s" in a:
            row["throughput_ratio_api_to_send_task"] = round(a["calls_per_s"] / t["calls_per_s"], 2)
        out[endpoint] = row
    return out


def report(phase: str, figures: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The phase's table and API-vs-send_task lines; the comparison figures."""
    table(phase, figures)
    compared = comparison(figures)
    print(f"\n{'API vs send_task':<24} {'p50 x':>8} {'+p50 ms':>8} {'+p95 ms':>8} {'+p99 ms':>8}")
    for endpoint, row in compared.items():
        print(
            f"{endpoint:<24} {row['p50_ratio_api_to_send_task']:>8} {row['p50_added_ms']:>8} "
            f"{row['p95_added_ms']:>8} {row['p99_added_ms']:>8}"
        )
    return compared


def emit_phase(
    phase: str, figures: dict[str, dict[str, Any]], compared: dict[str, dict[str, Any]]
) -> None:
    """Every figure of a phase, one block and JSON line each."""
    for name, row in figures.items():
        emit(f"{phase}: {name} (ms)", row)
    for endpoint, row in compared.items():
        emit(f"{phase}: {endpoint}, API vs send_task", {**row, "bar": "a few ms at p50"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    stack = build_stack("redis-postgres", Path(tempfile.mkdtemp(prefix="cul8er-bench-")))
    seq: dict[str, dict[str, Any]] = {}
    par: dict[str, dict[str, Any]] = {}
    setup: dict[str, Any] = {}
    try:
        start(stack)
        with serve(stack) as base:
            began = time.perf_counter()
            for name, samples in sequential(stack, base, args.calls).items():
                # One caller: calls per second of that operation alone (1000 / mean).
                rate = round(len(samples) * 1000 / sum(samples), 1)
                seq[name] = {**percentiles(samples), "calls_per_s": rate}
            seq_s = time.perf_counter() - began
            for name in OPERATIONS:
                samples, wall = concurrent(stack, base, name, args.calls, args.concurrency)
                par[name] = {**percentiles(samples), "calls_per_s": round(len(samples) / wall, 1)}
        parked = parked_messages(stack)
        setup = {
            "stack": "redis-postgres (Redis broker and results, PostgreSQL)",
            "worker_processes": WORKER_PROCESSES,
            "api_server": "cul8er api serve (uvicorn, 1 process), rate limits " + RATE,
            "provisioning": SETUP,
            "provision_steps_parked": parked,
            "instance_processes": len(instance_processes(stack.data_dir)),
            "calls_per_operation_and_phase": args.calls,
            "warm_up_calls": WARM_UP,
            "concurrency": args.concurrency,
            "sequential_phase_s": round(seq_s, 1),
        }
    finally:
        drop_parked(stack)
        teardown_stack(stack)
    shutil.rmtree(stack.data_dir, ignore_errors=True)  # kept (with the logs) after a failure
    emit("setup", setup)
    phases = {"sequential, 1 caller": seq, f"concurrent, {args.concurrency} callers": par}
    compared = {phase: report(phase, figures) for phase, figures in phases.items()}
    for phase, figures in phases.items():
        emit_phase(phase, figures, compared[phase])


if __name__ == "__main__":
    main()
