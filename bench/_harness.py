"""Start real worker processes on a broker and database, and time things against them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """p50/p95/p99 and mean of samples in milliseconds."""
    ordered = sorted(samples_ms)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {
        "n": len(ordered),
        "p50": round(pick(0.50), 2),
        "p95": round(pick(0.95), 2),
        "p99": round(pick(0.99), 2),
        "mean": round(statistics.fmean(ordered), 2),
    }


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A throw-away PostgreSQL database URL."""
    name = f"cul8er_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        from workers.runtime.db import dispose_engines, get_engine

        get_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}").dispose()
        dispose_engines()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def workers(env: dict[str, str], *, concurrency: int = 2, beat: bool = False) -> Iterator[Path]:
    """A real ``celery worker`` (and beat) with ``env``; yields the data dir."""
    data = Path(tempfile.mkdtemp(prefix="cul8er-bench-"))
    full = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
    full.update(CUL8ER_DATA_DIR=str(data), CUL8ER_LOG_LEVEL="WARNING", **env)
    base = [sys.executable, "-m", "celery", "-A", "workers.app"]
    commands = [
        [
            *base,
            "worker",
            "-Q",
            "lifecycle,metering,health,celery",
            "-c",
            str(concurrency),
            "--without-mingle",
            "--without-gossip",
            "-l",
            "WARNING",
            "-n",
            f"bench-{uuid.uuid4().hex[:6]}@%h",
        ]
    ]
    if beat:
        commands.append([*base, "beat", "-s", str(data / "beat"), "-l", "WARNING"])
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=full,
            start_new_session=True,
            stdout=open(data / "worker.log", "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )
        for cmd in commands
    ]
    try:
        yield data
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def wait_ready(client, timeout: float = 60) -> None:  # noqa: ANN001
    """Block until a worker answers ping."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.control.ping(timeout=0.5):
            return
    raise RuntimeError("no worker answered")


def emit(title: str, figures: dict) -> None:
    """Print figures for people and one JSON line for machines."""
    print(f"\n== {title}")
    for key, value in figures.items():
        print(f"  {key}: {value}")
    print("JSON " + json.dumps({"bench": title, **figures}))
