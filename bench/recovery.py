"""Recovery from a SIGKILLed worker: the owner-liveness rule beside the old lease-only rule.

Each sample provisions a tenant on the ``slowboot`` plan (its local instance takes 4 s to
start listening), waits until ``cul8er.tenants.create_instances`` is running with an
owner, SIGKILLs the whole process group of the worker holding it (time t0), starts a
replacement worker at once, and polls the ledger until the step is claimed again by a
live process; the sample is that claim's ``started_at`` minus t0. The rules run in this
one process, one after the other, each on its own Redis database flush, its own
throw-away PostgreSQL database and its own real ``celery worker`` and ``celery beat``
processes, configured only through ``CUL8ER_*`` variables:

* owner, exit check: the defaults (owner timeout 10 s, heartbeat 2 s, reconcile 5 s, and
  the same-host check that the owner's process still exists). Everything here runs on one
  host, so this is the figure for a worker killed on the host where reconcile runs;
* owner, heartbeat: ``CUL8ER_OWNER_EXIT_CHECK=false``, so only the owner's silent heartbeat
  reveals its death: the figure for a worker lost on another host (or a whole host lost);
* lease only: ``CUL8ER_OWNER_TIMEOUT=1000000`` and ``CUL8ER_OWNER_EXIT_CHECK=false``: only
  the lease (step time limit + 10 s) frees a dead worker's step, as before owners existed.

Every rule uses the same ``CUL8ER_STEP_TIME_LIMIT`` (30 s here, 300 s in production). Each
worker runs one step at a time (``-c 1``), so one kill takes exactly one step; several
kills run in parallel per round, each round starting at a random point of reconcile's
cycle. Two more workers run than steps are killed, so some always stay alive to run
reconcile, as the rest of a fleet would. The kill comes 0.2-2.5 s after the step is seen
running (the same delays for every rule), so it falls anywhere within a heartbeat
interval. Prints p50/p99/max per rule and the takeovers recorded; never fails on timing.

    python bench/recovery.py [--kills 20] [--parallel 4] [--step-time-limit 30] [--quick]
                             [--spares 2] [--redis-db 2] [--keep-logs]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
from celery import Celery  # noqa: E402

from bench._harness import ROOT, percentiles, pg_database  # noqa: E402

STEP = "cul8er.tenants.create_instances"
PLAN = "slowboot"
#: The production default of ``step_time_limit``; the lease is 10 s longer.
PRODUCTION_STEP_TIME_LIMIT = 300.0
#: Defaults of the owner rule (workers/runtime/settings.py), for the expected bounds printed.
OWNER_TIMEOUT, RECONCILE = 10.0, 5.0
#: A killed step is resumed within this margin past the rule's bound, or it is reported.
SLACK = 3.0
#: The kill comes this long after the step is first seen running (uniform, seconds).
KILL_DELAY = (0.2, 2.5)


@dataclass(frozen=True, eq=False)
class Rule:
    """One takeover rule: its settings, and how long a resume may take under it."""

    name: str
    env: dict[str, str]
    #: Seconds from the kill within which the rule resumes the step, given the lease.
    bound: Callable[[float], float]


RULES = (
    Rule("owner, exit check", {}, lambda _lease: RECONCILE),
    Rule(
        "owner, heartbeat",
        {"CUL8ER_OWNER_EXIT_CHECK": "false"},
        lambda _lease: OWNER_TIMEOUT + RECONCILE,
    ),
    Rule(
        "lease only",
        {"CUL8ER_OWNER_TIMEOUT": "1000000", "CUL8ER_OWNER_EXIT_CHECK": "false"},
        lambda lease: lease + RECONCILE,
    ),
)


@dataclass
class Sample:
    """One killed step and when it was claimed again."""

    tenant_id: str
    run_id: str
    killed_attempt: int
    killed_node: str
    t0: float
    resumed_after: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    run_status: str | None = None


@dataclass
class Fleet:
    """The worker and beat processes of one arm, each leading its own process group."""

    data_dir: Path
    database_url: str
    env: dict[str, str]
    client: Celery
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.data_dir / log_name, "ab")  # noqa: SIM115 - the child owns it
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.app", *args],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so the whole worker can be SIGKILLed at once
            )
        finally:
            log.close()

    def start_worker(self, role: str) -> str:
        """A ``celery worker`` running one step at a time; returns its node prefix."""
        prefix = f"{role}-{uuid.uuid4().hex[:6]}"
        self.workers[prefix] = self._spawn(
            [
                "worker",
                "-Q",
                "lifecycle,metering,health,celery",
                "-c",
                "1",
                "-n",
                f"{prefix}@%h",
                "--without-mingle",
                "--without-gossip",
                "-l",
                "INFO",
            ],
            f"worker-{prefix}.log",
        )
        return prefix

    def start_beat(self) -> None:
        schedule = self.data_dir / f"beat-{uuid.uuid4().hex[:6]}"
        self.others.append(self._spawn(["beat", "-s", str(schedule), "-l", "INFO"], "beat.log"))

    def live(self) -> list[str]:
        return [prefix for prefix, proc in self.workers.items() if proc.poll() is None]

    def wait_ready(self, prefixes: list[str], timeout: float = 90) -> None:
        """Block until every worker named answers ping."""
        deadline = time.monotonic() + timeout
        waiting = set(prefixes)
        while waiting and time.monotonic() < deadline:
            for reply in self.client.control.ping(timeout=0.5) or []:
                waiting.discard(next(iter(reply)).split("@")[0])
        if waiting:
            raise RuntimeError(f"workers {sorted(waiting)} did not start; see {self.data_dir}")

    def holder(self, node: str | None, pid: int | None) -> str | None:
        """The worker whose pool child is (node, pid), if it is one of ours and alive."""
        prefix = (node or "").split("@")[0]
        if prefix in self.workers:
            return prefix if self.workers[prefix].poll() is None else None
        with contextlib.suppress(psutil.Error, TypeError):
            parents = {pid, *(p.pid for p in psutil.Process(pid).parents())}  # type: ignore[arg-type]
            for prefix, proc in self.workers.items():
                if proc.pid in parents and proc.poll() is None:
                    return prefix
        return None

    def kill(self, prefix: str) -> float:
        """SIGKILL a worker's whole process group; returns the wall-clock time of the kill."""
        proc = self.workers[prefix]
        t0 = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        return t0

    def stop(self) -> None:
        procs = [*self.workers.values(), *self.others]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            # A worker killed while a pool child stayed behind: take the whole group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def step_rows(database_url: str, run_ids: list[str]) -> dict[str, Any]:
    """The ``create_instances`` row of each run, with its owner's node and pid."""
    from sqlalchemy import select

    from workers.runtime.db import session_scope
    from workers.runtime.models import StepRun, WorkerProcess

    with session_scope(database_url) as session:
        rows = session.execute(
            select(
                StepRun.run_id,
                StepRun.status,
                StepRun.attempts,
                StepRun.owner_id,
                StepRun.started_at,
                StepRun.history,
                WorkerProcess.node,
                WorkerProcess.pid,
            )
            .outerjoin(WorkerProcess, WorkerProcess.boot_id == StepRun.owner_id)
            .where(StepRun.run_id.in_(run_ids), StepRun.name == STEP, StepRun.phase == "forward")
        ).all()
    return {row.run_id: row for row in rows}


def run_statuses(database_url: str, run_ids: list[str]) -> dict[str, str]:
    from sqlalchemy import select

    from workers.runtime.db import session_scope
    from workers.runtime.models import WorkflowRun

    with session_scope(database_url) as session:
        rows = session.execute(
            select(WorkflowRun.id, WorkflowRun.status).where(WorkflowRun.id.in_(run_ids))
        ).all()
    return {run_id: status for run_id, status in rows}


def wait_runs(database_url: str, run_ids: list[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        statuses = run_statuses(database_url, run_ids)
        if all(s in ("succeeded", "failed") for s in statuses.values()):
            return statuses
        if time.monotonic() > deadline:
            return statuses
        time.sleep(0.2)


def one_round(
    fleet: Fleet,
    database_url: str,
    count: int,
    *,
    rng: random.Random,
    resume_timeout: float,
) -> list[Sample]:
    """Provision ``count`` tenants, kill the worker under each one's step, time the resumes."""
    started: dict[str, str] = {}  # run id -> tenant id
    for _ in range(count):
        tenant_id = f"r{uuid.uuid4().hex[:8]}"
        created = fleet.client.send_task(
            "cul8er.tenants.create",
            kwargs={"name": f"Recovery {tenant_id}", "plan": PLAN, "tenant_id": tenant_id},
        ).get(timeout=60)
        if not created.get("ok"):
            print(f"  ! create {tenant_id} refused: {created}")
            continue
        started[created["workflow_id"]] = tenant_id
    run_ids = list(started)
    delays = {run_id: rng.uniform(*KILL_DELAY) for run_id in run_ids}
    kill_at: dict[str, float] = {}
    samples: dict[str, Sample] = {}
    start_deadline = time.monotonic() + 90
    while True:
        now = time.monotonic()
        rows = step_rows(database_url, run_ids)
        for run_id in run_ids:
            row = rows.get(run_id)
            if row is None:
                continue
            sample = samples.get(run_id)
            if sample is None:
                if row.status != "running" or not row.owner_id:
                    continue
                kill_at.setdefault(run_id, now + delays[run_id])
                if now < kill_at[run_id]:
                    continue
                prefix = fleet.holder(row.node, row.pid)
                if prefix is None:
                    continue  # its worker is one killed already: the row is stale
                t0 = fleet.kill(prefix)
                fleet.start_worker("heir")
                samples[run_id] = Sample(
                    started[run_id], run_id, row.attempts, row.node or "?", t0=t0
                )
            elif sample.resumed_after is None and row.attempts > sample.killed_attempt:
                sample.resumed_after = row.started_at.timestamp() - sample.t0
        waiting_kill = [r for r in run_ids if r not in samples]
        waiting_resume = [s for s in samples.values() if s.resumed_after is None]
        if not waiting_kill and not waiting_resume:
            break
        if waiting_kill and now > start_deadline:
            print(f"  ! {len(waiting_kill)} run(s) never showed {STEP} running; not sampled")
            run_ids = [r for r in run_ids if r in samples]
            continue
        if waiting_resume and all(time.time() - s.t0 > resume_timeout for s in waiting_resume):
            print(f"  ! {len(waiting_resume)} step(s) not resumed within {resume_timeout:.0f} s")
            break
        time.sleep(0.05)

    # Let every run finish, then remove its tenant, so instances never pile up.
    all_runs = list(started)
    statuses = wait_runs(database_url, all_runs, timeout=resume_timeout + 120)
    rows = step_rows(database_url, all_runs)
    for run_id, sample in samples.items():
        sample.run_status = statuses.get(run_id)
        sample.history = list(rows[run_id].history or []) if run_id in rows else []
    gone = []
    for run_id, tenant_id in started.items():
        with contextlib.suppress(Exception):
            reply = fleet.client.send_task(
                "cul8er.tenants.deprovision", kwargs={"tenant_id": tenant_id}
            ).get(timeout=60)
            if reply.get("ok"):
                gone.append(reply["workflow_id"])
            else:
                print(f"  ! deprovision {tenant_id} (run {statuses.get(run_id)}): {reply}")
    wait_runs(database_url, gone, timeout=120)
    return list(samples.values())


def cleanup_instances(data_dir: Path) -> None:
    """Destroy every local instance of this data dir and kill any process left of one."""
    from plugins.platforms.local import LocalPlatform
    from tests.stack import instance_processes

    with contextlib.suppress(Exception):
        platform = LocalPlatform(state_dir=data_dir / "instances")
        for info in platform.list_instances():
            with contextlib.suppress(Exception):
                platform.destroy_instance(info.name)
    for proc in instance_processes(data_dir):
        with contextlib.suppress(Exception):
            proc.kill()


@contextlib.contextmanager
def arm_stack(
    redis_url: str, extra: dict[str, str], step_time_limit: float, *, keep_logs: bool = False
) -> Iterator[Fleet]:
    """A fresh Redis db, database, data dir and beat for one arm; all removed afterwards."""
    import redis

    from tests.stack import write_plans
    from workers.runtime.migrate import upgrade

    redis.Redis.from_url(redis_url).flushdb()
    data_dir = Path(tempfile.mkdtemp(prefix="cul8er-bench-recovery-"))
    previous: Any = None
    try:
        with pg_database() as database_url:
            upgrade(database_url)
            write_plans(data_dir / "plans.yaml")
            env = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
            env.update(
                CUL8ER_DATA_DIR=str(data_dir),
                CUL8ER_DATABASE_URL=database_url,
                CUL8ER_BROKER_URL=redis_url,
                CUL8ER_PLANS_FILE=str(data_dir / "plans.yaml"),
                CUL8ER_STEP_TIME_LIMIT=str(step_time_limit),
                CUL8ER_LOG_FORMAT="json",
                **extra,
            )
            client = Celery("bench", broker=redis_url, backend=redis_url)
            client.conf.update(
                task_serializer="json", accept_content=["json"], result_serializer="json"
            )
            fleet = Fleet(data_dir, database_url, env, client)
            try:
                yield fleet
            finally:
                # A second Ctrl-C must not stop the clean-up half-way (nor the drop after it).
                previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
                fleet.stop()
                cleanup_instances(data_dir)
                client.close()
    finally:
        with contextlib.suppress(Exception):
            redis.Redis.from_url(redis_url).flushdb()
        if keep_logs:
            print(f"  logs kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def run_arm(
    rule: Rule,
    *,
    redis_url: str,
    kills: int,
    parallel: int,
    spares: int,
    step_time_limit: float,
    seed: int,
    keep_logs: bool = False,
) -> list[Sample]:
    lease = step_time_limit + 10
    resume_timeout = lease + RECONCILE + 60
    rng = random.Random(seed)  # the same kill delays for every rule
    # Rounds last about the same each time and would keep falling at the same point of
    # reconcile's 5 s cycle: a random pause before each round spreads the kills over it.
    pauses = random.Random(seed + 1)
    samples: list[Sample] = []
    print(f"\n== {rule.name}: {kills} kills, {parallel} at a time", flush=True)
    with arm_stack(redis_url, rule.env, step_time_limit, keep_logs=keep_logs) as fleet:
        database_url = fleet.database_url
        fleet.start_beat()
        fleet.wait_ready([fleet.start_worker("doomed") for _ in range(parallel + spares)])
        round_no = 0
        while len(samples) < kills:
            round_no += 1
            # Every worker of the round answers before the provisions go out.
            fleet.wait_ready(fleet.live())
            time.sleep(pauses.uniform(0, RECONCILE))
            count = min(parallel, kills - len(samples))
            begun = time.monotonic()
            got = one_round(fleet, database_url, count, rng=rng, resume_timeout=resume_timeout)
            samples += got
            shown = ", ".join(
                f"{s.resumed_after:.1f}" if s.resumed_after is not None else "never" for s in got
            )
            print(
                f"  round {round_no}: resumed after [{shown}] s "
                f"(round {time.monotonic() - begun:.0f} s)",
                flush=True,
            )
            if not got:
                print("  ! a round took no sample; stopping this arm")
                break
    return samples


def takeovers(sample: Sample) -> list[dict[str, Any]]:
    return [h for h in sample.history if h.get("event") == "takeover"]


def report(results: dict[Rule, list[Sample]], *, step_time_limit: float, wall: float) -> None:
    lease = step_time_limit + 10
    figures: dict[str, dict[str, float]] = {}
    print(f"\n== time from SIGKILL of a worker to its step claimed again (s), {STEP}")
    print(f"  step time limit {step_time_limit:g} s for every rule (lease {lease:g} s)")
    print(f"  {'rule':<18} {'n':>3} {'p50':>7} {'p99':>7} {'max':>7}  not resumed")
    for rule, samples in results.items():
        got = [s.resumed_after for s in samples if s.resumed_after is not None]
        missing = len(samples) - len(got)
        if not got:
            print(f"  {rule.name:<18} {0:>3} {'-':>7} {'-':>7} {'-':>7}  {missing}")
            continue
        figs = percentiles(got)  # unit-free: these are seconds
        figs["max"] = round(max(got), 2)
        figures[rule.name] = figs
        print(
            f"  {rule.name:<18} {figs['n']:>3} {figs['p50']:>7.2f} {figs['p99']:>7.2f} "
            f"{figs['max']:>7.2f}  {missing}"
        )
    lease_only = figures.get("lease only")
    for name, figs in figures.items():
        if lease_only and figs is not lease_only and figs["p50"] > 0:
            print(f"  lease only / {name} at p50: {lease_only['p50'] / figs['p50']:.1f}x")
    production = PRODUCTION_STEP_TIME_LIMIT + 10
    print(
        f"  with the production step time limit ({PRODUCTION_STEP_TIME_LIMIT:g} s) the lease-only "
        f"figure would be ~{production:g} s (lease) plus up to {RECONCILE:g} s of reconcile; "
        "the owner rules do not depend on it"
    )
    print("\n== takeovers recorded in the killed steps' history")
    for rule, samples in results.items():
        seen = collections.Counter(
            f"{t.get('reason')} by {t.get('by')}" for s in samples for t in takeovers(s)
        )
        ends = collections.Counter(s.run_status for s in samples)
        print(f"  {rule.name}: {dict(seen)}; runs: {dict(ends)}")
        # Where the time goes: until the takeover (death noticed on reconcile's turn), then
        # until a worker claims the step from the re-dispatched message.
        found, silent, claim = [], [], []
        for s in samples:
            first = next(iter(takeovers(s)), None)
            if first is None or s.resumed_after is None:
                continue
            at = dt.datetime.fromisoformat(first["at"]).timestamp() - s.t0
            found.append(at)
            claim.append(s.resumed_after - at)
            if first.get("silent_for") is not None:
                silent.append(float(first["silent_for"]))
        if found:
            print(
                f"    p50: taken over {statistics.median(found):.2f} s after the kill "
                f"(range {min(found):.2f}-{max(found):.2f}), owner silent "
                f"{statistics.median(silent) if silent else float('nan'):.2f} s by then, "
                f"claimed {statistics.median(claim):.2f} s after the takeover"
            )
    for rule, samples in results.items():
        bound = rule.bound(lease) + SLACK
        odd = [
            s
            for s in samples
            if s.resumed_after is None
            or s.resumed_after > bound
            or s.run_status != "succeeded"
            or len(takeovers(s)) != 1
        ]
        for s in odd:
            after = "never" if s.resumed_after is None else f"{s.resumed_after:.2f} s"
            print(
                f"\n  ! {rule.name}: run {s.run_id} (tenant {s.tenant_id}, killed "
                f"{s.killed_node} at attempt {s.killed_attempt}) resumed after {after}, run "
                f"{s.run_status}; expected <= {bound:g} s and one takeover. History:"
            )
            for entry in s.history:
                print(f"      {json.dumps(entry)}")
    print(f"\n  wall time {wall:.0f} s")
    print(
        "JSON "
        + json.dumps(
            {
                "bench": "recovery from a killed worker (s)",
                "step_time_limit": step_time_limit,
                **figures,
                "wall_s": round(wall, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=20, help="killed steps per rule")
    parser.add_argument("--parallel", type=int, default=4, help="kills per round")
    parser.add_argument("--spares", type=int, default=2, help="workers beside those killed")
    parser.add_argument("--step-time-limit", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="5 kills per rule")
    parser.add_argument("--redis-db", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    args = parser.parse_args()
    kills = 5 if args.quick else args.kills
    parallel = max(1, min(args.parallel, kills))

    import logging

    from workers.runtime.logging import configure_logging

    configure_logging(fmt="console", level="WARNING")
    logging.getLogger().setLevel(logging.WARNING)

    def _terminated(_signum: int, _frame: Any) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _terminated)
    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    began = time.monotonic()
    results: dict[Rule, list[Sample]] = {}
    try:
        for rule in RULES:
            results[rule] = run_arm(
                rule,
                redis_url=redis_url,
                kills=kills,
                parallel=parallel,
                spares=max(0, args.spares),
                step_time_limit=args.step_time_limit,
                seed=args.seed,
                keep_logs=args.keep_logs,
            )
    except (KeyboardInterrupt, SystemExit):
        print("\n  interrupted; everything this bench started is stopped")
        raise
    report(results, step_time_limit=args.step_time_limit, wall=time.monotonic() - began)


if __name__ == "__main__":
    main()
