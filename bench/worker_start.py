"""Worker start and memory: a cul8er worker (every built-in plugin active) against bare Celery.

Prints figures, never fails on timing::

    python bench/worker_start.py [--runs N] [--concurrency N] [--database postgres|sqlite]

Each round spawns both workers one after the other (which one first alternates, so both see
the same noise) and times each from spawn to its first ``control.ping`` reply, then reads
the PSS and RSS of its main process and pool children (``/proc/<pid>/smaps_rollup``) once the
pool is up, and stops it. One round first is discarded (bytecode caches written, page cache
warm). Both run the command ``cul8er up`` runs for its worker (``python -m celery -A <app>
worker -Q lifecycle,metering,health,celery -c N``), with ``--without-mingle
--without-gossip`` so that neither waits for other workers on the broker.

* cul8er: ``workers.app``, its data dir and database fresh for this run, every built-in
  plugin active (the webhook
  observer given a URL, which it needs; the bench prints the states of the ``plugins``
  table after the first start);
* bare: a Celery app with one no-op task on the same broker, same queues, same pool.

The broker is Redis on 127.0.0.1:6379, in a database claimed the way the tests claim theirs
(a key in database 0, see ``tests/conftest.py``), flushed, and released at the end: other
benchmarks use fixed databases, and a worker here must never take their messages.

The database is a scratch PostgreSQL database on 127.0.0.1:5432 (user postgres, dropped at
the end), or with ``--database sqlite`` the embedded default, a SQLite file in the data dir.

Python does not write bytecode when ``PYTHONDONTWRITEBYTECODE`` is set, and every start would
then compile cul8er's modules from source (an installed cul8er ships them compiled). The bench
clears it for the workers, unless ``--no-bytecode-cache``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import ROOT, percentiles, pg_database  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python")
if not Path(PYTHON).exists():  # pragma: no cover - another layout: use whatever runs us
    PYTHON = sys.executable
REDIS = "redis://127.0.0.1:6379"
#: Databases the bench may claim (the tests' range; a claim keeps them off it meanwhile).
CLAIMABLE_DBS = range(4, 16)
#: The claim key of a database, shared with ``tests/conftest.py``.
CLAIM_KEY = "cul8er-tests:redis-db:{db}"
#: The queues ``cul8er up`` gives its worker (``workers.runtime.queues.WORKER_QUEUES``).
QUEUES = "lifecycle,metering,health,celery"
#: Where the webhook observer would deliver (nothing listens: no event is sent at start).
WEBHOOK_URL = "http://127.0.0.1:9/cul8er-bench"
#: Memory target: PSS of the main process and two pool children, MiB.
TARGET_PSS_MB = 150.0
TARGET_RATIO = 1.3

_BARE_APP = textwrap.dedent(
    """\
    \"\"\"A bare Celery app for bench/worker_start.py: same broker, no cul8er.\"\"\"

    from celery import Celery

    app = Celery("bare", broker="{url}", backend="{url}")
    app.conf.task_default_queue = "lifecycle"


    @app.task(name="bench.bare_noop")
    def bare_noop():
        return None
    """
)


def _progress(text: str) -> None:
    """A transient progress line, on a terminal only (figures go to stdout)."""
    if sys.stderr.isatty():
        print(f"  {text:<40}", end="\r", flush=True, file=sys.stderr)


def _env(bytecode: bool, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(CUL8ER_LOG_LEVEL="WARNING", **extra)
    return env


def _memory(pid: int) -> dict[str, float]:
    """PSS and RSS of one process, MiB."""
    found: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                found[key.lower()] = int(rest.split()[0]) / 1024
    return found


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (Linux ``/proc/<pid>/task/*/children``)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _pool_memory(pid: int, concurrency: int, settle: float) -> dict[str, Any]:
    """Memory of the main process and its pool children once all of them are up."""
    deadline = time.monotonic() + 30
    while len(_children(pid)) < concurrency and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(settle)  # children finish their own start (logging, heartbeat) meanwhile
    children = _children(pid)
    main = _memory(pid)
    kids = [_memory(child) for child in children]
    return {
        "main": main,
        "children": kids,
        "pss": main["pss"] + sum(k["pss"] for k in kids),
        "rss": main["rss"] + sum(k["rss"] for k in kids),
    }


def _start(
    client: Any, app: str, env: dict[str, str], cwd: Path, log: Path, args: argparse.Namespace
) -> tuple[float, dict[str, Any]]:
    """Spawn a worker of ``app``; ms until it answers ping, and its memory; then stop it."""
    node = f"bench-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    command = [
        *(PYTHON, "-m", "celery", "-A", app, "worker", "-Q", QUEUES),
        *("-c", str(args.concurrency), "-n", node, "--loglevel", "WARNING"),
        *("--without-mingle", "--without-gossip"),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        while True:
            replies = client.control.ping(destination=[node], timeout=0.1)
            if any(node in reply for reply in replies or ()):
                elapsed = (time.perf_counter() - started) * 1000
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{app} worker exited {proc.returncode}; see {log}")
            if time.perf_counter() - started > 120:
                raise RuntimeError(f"{app} worker did not answer in 120 s; see {log}")
        return elapsed, _pool_memory(proc.pid, args.concurrency, args.settle)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def _database(kind: str, data: Path) -> Iterator[str]:
    """A migrated database URL: a scratch PostgreSQL database, or SQLite in ``data``."""
    from workers.runtime.migrate import upgrade

    if kind == "sqlite":
        url = f"sqlite:///{data / 'cul8er.db'}"
        upgrade(url)
        yield url
        return
    with pg_database() as url:
        upgrade(url)
        yield url


def _plugin_states(url: str) -> dict[str, str]:
    """``name: state`` of every row of the ``plugins`` table."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT name, state FROM plugins ORDER BY name")).all()
    finally:
        engine.dispose()
    return {str(name): str(state) for name, state in rows}


@contextlib.contextmanager
def _claimed_broker(wait: float = 120.0) -> Iterator[str]:
    """A Redis URL of a database no test stack or other claimant uses now, flushed."""
    import redis

    claims = redis.Redis.from_url(f"{REDIS}/0", socket_timeout=2)
    owner = f"bench-worker-start:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    deadline = time.monotonic() + wait
    db = None
    while db is None:
        db = next(
            (
                n
                for n in CLAIMABLE_DBS
                if claims.set(CLAIM_KEY.format(db=n), owner, nx=True, ex=3600)
            ),
            None,
        )
        if db is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"every Redis database {CLAIMABLE_DBS} is claimed")
            time.sleep(0.5)
    url = f"{REDIS}/{db}"
    try:
        redis.Redis.from_url(url, socket_timeout=2).flushdb()
        yield url
    finally:
        if claims.get(CLAIM_KEY.format(db=db)) == owner.encode():
            claims.delete(CLAIM_KEY.format(db=db))
        claims.close()


def run(
    args: argparse.Namespace, work: Path, url: str, data: Path, broker: str
) -> dict[str, list[Any]]:
    """All rounds; samples of each app: ``(ms, memory)``."""
    from celery import Celery

    from plugins.builtin import BUILTIN_MANIFESTS

    bytecode = not args.no_bytecode_cache
    cul8er_env = _env(
        bytecode,
        PYTHONPATH=str(ROOT),
        CUL8ER_DATA_DIR=str(data),
        CUL8ER_BROKER_URL=broker,
        CUL8ER_DATABASE_URL=url,
        # The webhook built-in needs a URL to be active (nothing is emitted at start).
        CUL8ER_PLUGIN_CONFIG=json.dumps({"webhook": {"url": WEBHOOK_URL}}),
    )
    bare_dir = work / "bare"
    bare_dir.mkdir()
    (bare_dir / "bench_bare_app.py").write_text(_BARE_APP.format(url=broker))
    bare_env = _env(bytecode, PYTHONPATH=str(bare_dir))
    apps = {
        "cul8er": ("workers.app", cul8er_env, ROOT),
        "bare": ("bench_bare_app", bare_env, bare_dir),
    }
    client = Celery("bench-client", broker=broker)
    client.control.ping(timeout=0.1)  # connect now, so no start pays for the client's setup
    samples: dict[str, list[Any]] = {"cul8er": [], "bare": []}
    try:
        for round_ in range(args.runs + 1):
            _progress(f"round {round_}/{args.runs}")
            order = ["cul8er", "bare"] if round_ % 2 else ["bare", "cul8er"]
            for name in order:
                app, env, cwd = apps[name]
                sample = _start(client, app, env, cwd, work / f"{name}.log", args)
                if round_:
                    samples[name].append(sample)
            if not round_:
                states = _plugin_states(url)
                active = sorted(n for n, s in states.items() if s == "active")
                expected = {m.name for m in BUILTIN_MANIFESTS}
                print(f"  plugins active in the cul8er worker: {len(active)} of {len(expected)}")
                for name, state in sorted(states.items()):
                    if state != "active":
                        print(f"    {name}: {state}")
    finally:
        client.close()
    _progress("")
    return samples


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def report(samples: dict[str, list[Any]], args: argparse.Namespace) -> None:
    """Print start times, their ratio, and memory."""
    times = {name: percentiles([ms for ms, _ in vals]) for name, vals in samples.items()}
    print(f"\n== Worker start to first ping reply, ms ({args.runs} starts each, interleaved)")
    for name, label in (("cul8er", "cul8er (all built-ins)"), ("bare", "bare Celery")):
        fig = times[name]
        print(
            f"  {label:<24} p50 {fig['p50']:8.1f}  p99 {fig['p99']:8.1f}  mean {fig['mean']:8.1f}"
        )
    ratio_p50 = times["cul8er"]["p50"] / times["bare"]["p50"]
    ratio_p99 = times["cul8er"]["p99"] / times["bare"]["p99"]
    goal = f"(goal <= {TARGET_RATIO})"
    print(f"  ratio cul8er/bare: p50 {ratio_p50:.2f}x  p99 {ratio_p99:.2f}x  {goal}")
    print("  (a ping sent before the worker listens is lost: polls wait 0.1 s, so +0-100 ms)")
    print(f"\n== Memory once the pool is up, MiB (median of {args.runs} starts; PSS, RSS)")
    memory: dict[str, dict[str, float]] = {}
    for name in ("cul8er", "bare"):
        mems = [m for _, m in samples[name]]
        fig = {
            "main_pss": _median([m["main"]["pss"] for m in mems]),
            "main_rss": _median([m["main"]["rss"] for m in mems]),
            "child_pss": _median([c["pss"] for m in mems for c in m["children"]]),
            "child_rss": _median([c["rss"] for m in mems for c in m["children"]]),
            "total_pss": _median([m["pss"] for m in mems]),
            "total_rss": _median([m["rss"] for m in mems]),
        }
        memory[name] = {k: round(v, 1) for k, v in fig.items()}
        print(
            f"  {name:<7} main {fig['main_pss']:6.1f} / {fig['main_rss']:6.1f}   "
            f"each child {fig['child_pss']:6.1f} / {fig['child_rss']:6.1f}   "
            f"main + {args.concurrency} children {fig['total_pss']:6.1f} / {fig['total_rss']:6.1f}"
        )
    print(f"  goal: cul8er main + 2 children PSS <= {TARGET_PSS_MB:g} MiB")
    print(
        "JSON "
        + json.dumps(
            {
                "bench": "worker_start",
                "database": args.database,
                "bytecode_cache": not args.no_bytecode_cache,
                "concurrency": args.concurrency,
                "cul8er": times["cul8er"],
                "bare": times["bare"],
                "ratio_p50": round(ratio_p50, 3),
                "ratio_p99": round(ratio_p99, 3),
                "memory_mib": memory,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="starts per app (one more discarded)")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes (-c)")
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds after the pool is up before memory"
    )
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="keep PYTHONDONTWRITEBYTECODE as it is (every start compiles from source)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cul8er-bench-start-"))
    data = work / "data"
    data.mkdir()
    try:
        with _claimed_broker() as broker, _database(args.database, data) as url:
            cache = "off" if args.no_bytecode_cache else "on"
            print(
                f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; broker {broker}; "
                f"database {args.database}; bytecode cache {cache}"
            )
            samples = run(args, work, url, data, broker)
        report(samples, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
