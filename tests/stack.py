"""A real cul8er stack for tests: worker and beat processes on a real broker and database.

Nothing is mocked: workers are ``celery -A workers.app worker`` subprocesses
configured only through ``CUL8ER_*`` environment variables, the test talks to
them the way another service would (``send_task`` by name), and reads the
database directly to check what happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from celery import Celery
from sqlalchemy.orm import Session

from schemas.states import FINAL_RUN, StepStatus
from workers.runtime.db import session_scope
from workers.runtime.embedded import EmbeddedRedis, EmbeddedServer
from workers.runtime.migrate import upgrade
from workers.runtime.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/{db}"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"

#: Settings that make the ledger's clocks fast enough for tests.
FAST_CLOCKS = {
    "CUL8ER_TICK_INTERVAL": "0.5",
    "CUL8ER_RECONCILE_INTERVAL": "1",
    "CUL8ER_RECONCILE_GRACE": "8",
    "CUL8ER_STEP_TIME_LIMIT": "10",
    "CUL8ER_STEP_MAX_ATTEMPTS": "3",
    "CUL8ER_RETRY_BACKOFF_BASE": "0.2",
    "CUL8ER_HEALTH_WINDOW": "2",
    "CUL8ER_LOG_FORMAT": "json",
}

#: Plans the tests add to the built-in catalog.
TEST_PLANS = """
  slowboot:
    cpu_cores: 0.5
    memory_gb: 0.5
    max_instances: 1
    images:
      local: "{python} -m plugins.platforms.instance_server --startup-delay 4"
  unhealthy:
    cpu_cores: 0.5
    memory_gb: 0.5
    max_instances: 1
    images:
      local: "{python} -m plugins.platforms.instance_server --unhealthy"
  glacial:
    cpu_cores: 0.5
    memory_gb: 0.5
    max_instances: 1
    images:
      local: "{python} -m plugins.platforms.instance_server --startup-delay 90"
  duo:
    cpu_cores: 1
    memory_gb: 1
    instances: 2
    max_instances: 4
"""


def reachable(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def write_plans(path: Path) -> Path:
    """The built-in catalog plus the test plans, as a YAML file."""
    builtin = (ROOT / "workers" / "economics" / "plans.yaml").read_text()
    path.write_text(builtin.rstrip() + "\n" + TEST_PLANS)
    return path


@dataclass
class Stack:
    """One broker + database + data dir, and the processes started on it.

    On the embedded broker (``broker_url`` None) the stack owns the server: :meth:`prepare`
    starts it as a child of the test process, :meth:`stop_broker` stops it, and it dies
    with the test process if that is killed first.
    """

    name: str
    data_dir: Path
    database_url: str
    broker_url: str | None  # None: the embedded Redis of data_dir
    result_backend: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    broker: EmbeddedServer | None = None
    _client: Celery | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment a cul8er process of this stack runs with."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
        env.update(FAST_CLOCKS)
        env.update(
            CUL8ER_DATA_DIR=str(self.data_dir),
            CUL8ER_DATABASE_URL=self.database_url,
            CUL8ER_PLANS_FILE=str(self.data_dir / "plans.yaml"),
        )
        if self.broker_url:
            env["CUL8ER_BROKER_URL"] = self.broker_url
        if self.result_backend:
            env["CUL8ER_RESULT_BACKEND"] = self.result_backend
        env.update(self.extra_env)
        return env

    @property
    def client(self) -> Celery:
        """A plain Celery client, as another service would hold (no cul8er config)."""
        if self._client is None:
            broker = self.broker_url or EmbeddedRedis(self.data_dir).url
            backend = self.result_backend or ("rpc://" if broker.startswith("amqp") else broker)
            self._client = Celery("client", broker=broker, backend=backend)
            self._client.conf.update(
                task_serializer="json", accept_content=["json"], result_serializer="json"
            )
        return self._client

    def prepare(self) -> None:
        """Migrate the database and start the embedded broker when there is one."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        write_plans(self.data_dir / "plans.yaml")
        if self.broker_url is None and self.broker is None:
            self.broker = EmbeddedRedis(self.data_dir).start()
        upgrade(self.database_url)

    def stop_broker(self) -> None:
        """Stop the embedded broker this stack started (its messages stay on disk)."""
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.data_dir / log_name, "ab")  # noqa: SIM115 - the child owns it
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", *args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a test can SIGKILL the whole worker at once
        )
        self.processes.append(process)
        return process

    def start_worker(
        self,
        name: str = "w1",
        *,
        concurrency: int = 2,
        wait: bool = True,
        queues: str = "lifecycle,metering,health,celery",
    ) -> subprocess.Popen[bytes]:
        """A real ``celery worker`` on every cul8er queue (or on ``queues``)."""
        unique = f"{name}-{uuid.uuid4().hex[:6]}@%h"
        process = self._spawn(
            [
                "worker",
                "-Q",
                queues,
                "-c",
                str(concurrency),
                "-n",
                unique,
                "--without-mingle",
                "--without-gossip",
                "-l",
                "INFO",
            ],
            f"worker-{name}.log",
        )
        if wait:
            self.wait_for_worker(unique.split("@")[0])
        return process

    def start_haproxy(self) -> Path:
        """HAProxy for this stack's tenants, as ``cul8er up`` runs it; its folder.

        The folder is short (unix socket paths are limited) and set for every process of
        the stack started afterwards (``CUL8ER_HAPROXY_DIR``).
        """
        folder = Path(tempfile.mkdtemp(prefix="hap", dir="/tmp"))
        self.extra_env["CUL8ER_HAPROXY_DIR"] = str(folder)
        log = open(self.data_dir / "haproxy.log", "ab")  # noqa: SIM115 - the child owns it
        process = subprocess.Popen(
            [sys.executable, "-m", "plugins.load_balancers.haproxy", "serve", "--dir", str(folder)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)

        def answers() -> bool:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1)
                sock.connect(str(folder / "admin.sock"))
                sock.sendall(b"show info\n")
                return b"Pid" in sock.recv(4096)
            return False

        wait_until(
            answers,
            timeout=20,
            interval=0.1,
            message=f"HAProxy did not start; see {self.data_dir / 'haproxy.log'}",
            error=AssertionError,
        )
        return folder

    def start_beat(self) -> subprocess.Popen[bytes]:
        """A real ``celery beat`` with this stack's fast clocks."""
        schedule = self.data_dir / f"beat-{uuid.uuid4().hex[:6]}"
        return self._spawn(["beat", "-s", str(schedule), "-l", "INFO"], "beat.log")

    def wait_for_worker(self, prefix: str, timeout: float = 60) -> None:
        """Block until a worker whose name starts with ``prefix`` answers ping."""

        def answered() -> bool:
            replies = self.client.control.ping(timeout=0.5) or []
            return any(next(iter(r)).startswith(prefix) for r in replies)

        # The ping itself waits half a second: no sleep between pings.
        wait_until(
            answered,
            timeout=timeout,
            interval=0,
            message=f"worker {prefix} did not start; see {self.data_dir}",
            error=AssertionError,
        )

    def call(self, task: str, timeout: float = 60, **kwargs: Any) -> dict[str, Any]:
        """Send a public task by name and return its JSON result."""
        result: dict[str, Any] = self.client.send_task(task, kwargs=kwargs).get(timeout=timeout)
        return result

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A database session on this stack's database."""
        with session_scope(self.database_url) as session:
            yield session

    def add_tenant(self, tenant_id: str, name: str) -> None:
        """A tenant row in ``provisioning`` on the local platform, as a create would leave it."""
        from workers.runtime.models import Tenant, utcnow

        with self.session() as session:
            session.add(
                Tenant(
                    id=tenant_id,
                    name=name,
                    plan="free",
                    status="provisioning",
                    platform="local",
                    resources={},
                    meta={},
                    billing_anchor=utcnow().date(),
                )
            )

    def wait_run(self, run_id: str, timeout: float = 90) -> dict[str, Any]:
        """Poll the ledger until the run ends; returns the run as ``workflows.status`` does.

        Past ``timeout`` it returns the run as it is then, for the test to assert on.
        """
        from workers.engine.views import describe_run
        from workers.runtime.models import WorkflowRun

        seen: list[dict[str, Any]] = []

        def ended() -> bool:
            with self.session() as session:
                run = session.get(WorkflowRun, run_id)
                assert run is not None, f"no run {run_id}"
                seen.append(describe_run(session, run))
            return seen[-1]["status"] in FINAL_RUN

        with contextlib.suppress(TimeoutError):
            wait_until(ended, timeout=timeout, interval=0.1)
        return seen[-1]

    def step_row(self, run_id: str, name: str, phase: str = "forward") -> Any:
        """The ledger row of one step of a run (detached, read-only)."""
        from sqlalchemy import select

        from workers.runtime.models import StepRun

        with self.session() as session:
            return session.scalars(
                select(StepRun).where(
                    StepRun.run_id == run_id, StepRun.phase == phase, StepRun.name == name
                )
            ).one()

    def wait_step_running(
        self, run_id: str, name: str, timeout: float = 60, phase: str = "forward"
    ) -> Any:
        """Poll until a step is running with an owner; returns its row."""
        seen: list[Any] = []

        def running() -> Any:
            seen.append(self.step_row(run_id, name, phase))
            row = seen[-1]
            return row if row.status == StepStatus.RUNNING and row.owner_id else None

        return wait_until(
            running,
            timeout=timeout,
            message=lambda: f"{name} of {run_id} never ran (status {seen[-1].status})",
            error=AssertionError,
        )

    def worker_of(self, boot_id: str) -> tuple[subprocess.Popen[bytes], int]:
        """The worker of this stack whose pool child is ``boot_id``, and that child's pid."""
        from workers.runtime.models import WorkerProcess

        with self.session() as session:
            row = session.get(WorkerProcess, boot_id)
            assert row is not None, f"no heartbeat row for {boot_id}"
            pid = row.pid
        parents = {pid, *(p.pid for p in psutil.Process(pid).parents())}
        for process in self.processes:
            if process.pid in parents and process.poll() is None:
                return process, pid
        raise AssertionError(f"process {pid} belongs to no live worker of this stack")

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL a worker and all its pool processes at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        """Stop every process this stack started."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        self.processes.clear()
        if self._client is not None:
            self._client.close()
            self._client = None


def instance_processes(data_dir: Path, name: str | None = None) -> list[psutil.Process]:
    """Live local-platform instance processes of this data dir (optionally one name)."""
    state = str(data_dir / "instances")
    found = []
    for proc in psutil.process_iter(["environ", "status"]):
        env = proc.info.get("environ") or {}
        if env.get("CUL8ER_INSTANCE_STATE") != state or proc.info["status"] == "zombie":
            continue
        if name is None or env.get("CUL8ER_INSTANCE") == name:
            found.append(proc)
    return found


def create_pg_database() -> str:
    """A fresh PostgreSQL database; returns its SQLAlchemy URL."""
    import psycopg

    name = f"cul8er_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(url: str) -> None:
    """Drop a database made by :func:`create_pg_database`."""
    import psycopg

    from workers.runtime.db import get_engine

    get_engine(url).dispose()
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
