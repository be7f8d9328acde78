"""What the chaos tests share: faults to inject, provisions to drive, and duplicates to find.

Every fault is a real one done to a real process: a Redis server of the test's own stopped
and started again, PostgreSQL backends terminated by an admin connection, a worker's
process group SIGKILLed. Nothing is mocked; the checks read the database, the local
platform's processes and a loopback webhook (tests/webhook.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from sqlalchemy import func, select, text

from plugins.provisioners.database_per_tenant import store_exists
from tests.stack import PG_ADMIN, Stack, create_pg_database, instance_processes
from workers.runtime.errors import TransientError
from workers.runtime.models import Instance, NetworkAllocation, StepRun, WorkflowRun
from workers.runtime.settings import Settings

T = TypeVar("T")

IN_CI = bool(os.environ.get("CI"))
#: Set to replay a run: every random choice of a chaos test comes from this seed.
SEED_VARIABLE = "CUL8ER_CHAOS_SEED"


def seeded_random(test: str) -> random.Random:
    """A ``random.Random`` for one test, its seed printed (``CUL8ER_CHAOS_SEED=<n>`` replays it)."""
    given = os.environ.get(SEED_VARIABLE)
    seed = int(given) if given else random.SystemRandom().randrange(2**32)
    print(f"\n[{test}] seed {seed} (replay: {SEED_VARIABLE}={seed})")
    return random.Random(seed)


def until(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


# -- a Redis server of the test's own ------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A ``redis-server`` child process on a spare loopback port, to stop and start again.

    It keeps nothing across a restart (``--save ""``, ``--appendonly no``): a broker that
    comes back empty is the worst a restart can do (every queued, unacknowledged and
    scheduled message is gone), which is what cul8er's ledger must recover from on its own;
    a persistent broker would hand most messages back and hide that path.
    """

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not on PATH"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """The Redis URL of database ``db`` on this server."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 15) -> None:
        """Start the server on its port and wait until it answers PING."""
        assert self.process is None or self.process.poll() is not None, "already running"
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            deadline = time.monotonic() + timeout
            while True:
                assert self.process.poll() is None, f"redis-server exited; see {self.directory}"
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                assert time.monotonic() < deadline, f"redis-server did not answer on {self.port}"
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the server and wait for it to be gone."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


# -- PostgreSQL ----------------------------------------------------------------------------------


def database_name(url: str) -> str:
    """The database name of a SQLAlchemy URL made by ``create_pg_database``."""
    return url.rsplit("/", 1)[1].split("?", 1)[0]


def terminate_backends(database_url: str) -> int:
    """Terminate every connection to the stack's database (but this one); how many."""
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database_name(database_url),),
        ).fetchall()
    return sum(1 for (done,) in rows if done)


def read(stack: Stack, query: Callable[[Any], T], timeout: float = 30) -> T:
    """``query(session)`` on the stack's database, again if the connection was just cut."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with stack.session() as session:
                return query(session)
        except TransientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- stacks --------------------------------------------------------------------------------------


@contextlib.contextmanager
def own_stack(
    data_dir: Path, broker_url: str | None, extra_env: dict[str, str] | None = None
) -> Iterator[Stack]:
    """A prepared stack on a fresh PostgreSQL database and ``broker_url`` (``None``: the
    embedded Redis of ``data_dir``, which no other test run's workers consume);
    torn down like the conftest's stacks whatever happens."""
    from tests.conftest import require, teardown_stack

    require("postgres")
    stack = Stack("chaos", data_dir, create_pg_database(), broker_url, extra_env=extra_env or {})
    try:
        stack.prepare()
        yield stack
    finally:
        teardown_stack(stack)


def logs(stack: Stack, pattern: str = "worker-*.log") -> str:
    """The text of the stack's worker logs (every restart appends to its worker's file)."""
    return "\n".join(
        path.read_text(errors="replace") for path in sorted(stack.data_dir.glob(pattern))
    )


def log_events(stack: Stack, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of the stack's workers whose ``event`` is ``event``."""
    found = []
    for line in logs(stack).splitlines():
        if f'"{event}"' not in line or not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("event") == event:
                found.append(entry)
    return found


def log_counts(stack: Stack, *events: str) -> dict[str, int]:
    """How many times each of ``events`` was logged by the stack's workers and beat."""
    text_of_logs = logs(stack, "*.log")
    return {event: text_of_logs.count(f'"event": "{event}"') for event in events}


def received_by(stack: Stack, task_id: str) -> str | None:
    """The worker that first received task ``task_id`` (by its log), if one has."""
    marker = f"[{task_id}] received"
    first: tuple[str, str] | None = None
    for path in sorted(stack.data_dir.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if marker in line:
                with contextlib.suppress(ValueError):
                    moment = str(json.loads(line).get("timestamp", ""))
                    if first is None or moment < first[0]:
                        first = (moment, path.stem.removeprefix("worker-"))
                break
    return first[1] if first else None


# -- provisions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provision:
    """One tenant sent to ``cul8er.tenants.create`` and the run that provisions it."""

    tenant_id: str
    plan: str
    run_id: str

    @property
    def instance(self) -> str:
        """The name of its (only) instance on the local platform."""
        return f"t-{self.tenant_id}-app-0"


def start_provisions(stack: Stack, plans: list[str], prefix: str = "c") -> list[Provision]:
    """Send one ``cul8er.tenants.create`` per plan at once; the runs they started."""
    ids = [f"{prefix}{uuid.uuid4().hex[:8]}" for _ in plans]
    sent = [
        stack.client.send_task(
            "cul8er.tenants.create",
            kwargs={"name": f"Chaos {tenant_id}", "plan": plan, "tenant_id": tenant_id},
        )
        for tenant_id, plan in zip(ids, plans, strict=True)
    ]
    made = []
    for tenant_id, plan, result in zip(ids, plans, sent, strict=True):
        answer = result.get(timeout=60)
        assert answer["ok"], answer
        made.append(Provision(tenant_id, plan, answer["workflow_id"]))
    return made


def running_steps(stack: Stack, run_ids: list[str]) -> list[str]:
    """The names of the steps of these runs that a worker holds right now."""
    return read(
        stack,
        lambda s: list(
            s.scalars(
                select(StepRun.name).where(StepRun.run_id.in_(run_ids), StepRun.status == "running")
            )
        ),
    )


@dataclass
class Finished:
    """How a set of runs ended: status and end time per run id."""

    status: dict[str, str]
    finished_at: dict[str, dt.datetime | None]

    @property
    def last_end(self) -> dt.datetime:
        ends = [moment for moment in self.finished_at.values() if moment is not None]
        assert ends, "no run has finished"
        return max(ends)


def wait_runs(stack: Stack, run_ids: list[str], timeout: float) -> Finished:
    """Poll the ledger until every run has ended (or ``timeout``); how they stand then."""

    def look(session: Any) -> Finished:
        rows = session.execute(
            select(WorkflowRun.id, WorkflowRun.status, WorkflowRun.finished_at).where(
                WorkflowRun.id.in_(run_ids)
            )
        ).all()
        return Finished({r.id: r.status for r in rows}, {r.id: r.finished_at for r in rows})

    deadline = time.monotonic() + timeout
    while True:
        found = read(stack, look)
        ended = all(s in ("succeeded", "failed") for s in found.status.values())
        if (ended and len(found.status) == len(run_ids)) or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def describe_unfinished(stack: Stack, finished: Finished) -> str:
    """The ledger's view of every run that did not succeed, with the tail of each log."""
    from workers.engine.views import describe_run

    views = []
    with stack.session() as session:
        for run_id, status in finished.status.items():
            if status != "succeeded":
                run = session.get(WorkflowRun, run_id)
                views.append(describe_run(session, run))
    tails = {
        path.name: path.read_text(errors="replace").splitlines()[-15:]
        for path in sorted(stack.data_dir.glob("*.log"))
    }
    return json.dumps({"runs": views, "logs": tails}, indent=1, default=str)[:20000]


def ledger_figures(stack: Stack, run_ids: list[str]) -> dict[str, int]:
    """Attempts beyond the first and takeovers across the steps of these runs."""
    rows = read(
        stack,
        lambda s: s.execute(
            select(StepRun.attempts, StepRun.history).where(StepRun.run_id.in_(run_ids))
        ).all(),
    )
    return {
        "steps": len(rows),
        "extra_attempts": sum(max(0, attempts - 1) for attempts, _ in rows),
        "takeovers": sum(
            1 for _, history in rows for h in history or [] if h.get("event") == "takeover"
        ),
    }


def assert_provisioned_once(stack: Stack, provisions: list[Provision]) -> None:
    """Each tenant has exactly one of everything a provision makes, and nobody has more."""
    tenant_ids = [p.tenant_id for p in provisions]

    def rows(session: Any) -> tuple[list[Any], list[Any], list[str]]:
        instances = session.execute(
            select(Instance.tenant_id, Instance.name).where(Instance.tenant_id.in_(tenant_ids))
        ).all()
        subnets = session.execute(
            select(NetworkAllocation.tenant_id, NetworkAllocation.cidr).where(
                NetworkAllocation.tenant_id.in_(tenant_ids)
            )
        ).all()
        schemas = session.scalars(
            text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant\\_%'")
        ).all()
        return instances, subnets, list(schemas)

    instances, subnets, schemas = read(stack, rows)
    # One Instance row per tenant, under the name its provision gives it
    assert sorted((t, n) for t, n in instances) == sorted(
        (p.tenant_id, p.instance) for p in provisions
    ), instances
    # One live instance process per instance name, and none besides
    for p in provisions:
        alive = instance_processes(stack.data_dir, p.instance)
        assert len(alive) == 1, (p, [proc.pid for proc in alive])
    assert len(instance_processes(stack.data_dir)) == len(provisions)
    # One subnet per tenant, no two the same
    assert sorted(t for t, _ in subnets) == sorted(tenant_ids), subnets
    assert len({cidr for _, cidr in subnets}) == len(provisions), subnets
    # One data store per tenant (a schema in the stack's database), and no stray one
    settings = Settings(data_dir=stack.data_dir, database_url=stack.database_url)
    for tenant_id in tenant_ids:
        assert store_exists(settings, tenant_id), tenant_id
    assert sorted(schemas) == sorted(f"tenant_{t}" for t in tenant_ids), schemas


def deprovision_all(stack: Stack, provisions: list[Provision], timeout: float = 120) -> None:
    """Deprovision every tenant; each run succeeds and no instance process is left."""
    sent = [
        stack.client.send_task("cul8er.tenants.deprovision", kwargs={"tenant_id": p.tenant_id})
        for p in provisions
    ]
    run_ids = []
    for result in sent:
        answer = result.get(timeout=60)
        assert answer["ok"], answer
        run_ids.append(answer["workflow_id"])
    finished = wait_runs(stack, run_ids, timeout)
    assert set(finished.status.values()) == {"succeeded"}, describe_unfinished(stack, finished)
    leftovers = instance_processes(stack.data_dir)
    assert leftovers == [], [(p.pid, p.cmdline()) for p in leftovers]
    count = read(stack, lambda s: s.scalar(select(func.count()).select_from(NetworkAllocation)))
    assert count == 0
