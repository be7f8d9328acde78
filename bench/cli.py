"""How long the ``cul8er`` command takes before it answers, against ``celery --help``.

    python bench/cli.py [--runs 9] [--database sqlite|postgres]

Each command runs ``--runs`` times as a fresh process (the way ops scripts call it in loops),
interleaved: every round runs each command once, in an order rotated from round to round, so
the load other processes put on the machine falls on all of them alike. The commands:
``celery --help`` from the same environment (the baseline), ``cul8er --help``, and the read
commands on a migrated data dir of their own holding one tenant (an instance, a subnet), one
finished workflow run with its steps and one invoice. Prints p50/p90 wall times and each
one's ratio to the baseline's p50; the figures never fail the run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import emit, pg_database  # noqa: E402

BIN = Path(sys.executable).parent
BASELINE = "celery --help"
TENANT = "benchco"
RUN = "b" * 32


def wall_times(
    commands: dict[str, list[str]], env: dict[str, str], runs: int
) -> dict[str, list[float]]:
    """Wall seconds of ``runs`` fresh runs of each command, interleaved (output discarded)."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for round_ in range(runs):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            done = subprocess.run(
                commands[name], env=env, capture_output=True, check=False, timeout=60
            )
            times[name].append(time.perf_counter() - started)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed: {done.stderr.decode()[-500:]}")
    return times


def seed(url: str) -> None:
    """One tenant with an instance and a subnet, one finished run with two steps, an invoice."""
    from workers.runtime.db import session_scope
    from workers.runtime.models import (
        Instance,
        Invoice,
        NetworkAllocation,
        StepRun,
        Tenant,
        WorkflowRun,
        utcnow,
    )

    now = utcnow()
    with session_scope(url) as session:
        session.add(
            Tenant(
                id=TENANT,
                name="Bench Co",
                plan="starter",
                status="active",
                platform="local",
                resources={"subnet": "10.100.7.0/24"},
                meta={},
                billing_anchor=now.date(),
            )
        )
        session.flush()
        session.add(NetworkAllocation(cidr="10.100.7.0/24", tenant_id=TENANT))
        session.add(
            Instance(
                tenant_id=TENANT,
                name=f"{TENANT}-web-0",
                platform="local",
                role="web",
                ordinal=0,
                status="running",
                endpoint="127.0.0.1:21001",
                limits={"applied": {"cpus": 1}},
            )
        )
        session.add(
            WorkflowRun(
                id=RUN,
                kind="tenant.provision",
                tenant_id=TENANT,
                status="succeeded",
                finished_at=now,
            )
        )
        session.flush()
        for position, name in enumerate(("allocate_network", "create_instances")):
            session.add(
                StepRun(
                    run_id=RUN,
                    phase="forward",
                    position=position,
                    name=f"cul8er.tenants.{name}",
                    status="done",
                    attempts=1,
                    output={"ok": True},
                    started_at=now,
                    finished_at=now,
                )
            )
        session.add(
            Invoice(
                id="i" * 32,
                tenant_id=TENANT,
                period_start=now - dt.timedelta(days=30),
                period_end=now,
                currency="EUR",
                total=12.5,
                status="issued",
                lines=[{"kind": "plan", "plan": "starter", "amount": 12.5}],
            )
        )


@contextlib.contextmanager
def database(kind: str) -> Iterator[str | None]:
    """``None`` for the data dir's SQLite file, or a throw-away PostgreSQL database's URL."""
    if kind == "sqlite":
        yield None
    else:
        with pg_database() as url:
            yield url


def commands() -> dict[str, list[str]]:
    cul8er = str(BIN / "cul8er")
    return {
        BASELINE: [str(BIN / "celery"), "--help"],
        "cul8er --help": [cul8er, "--help"],
        "cul8er tenant list --json": [cul8er, "tenant", "list", "--json"],
        "cul8er tenant show --json": [cul8er, "tenant", "show", TENANT, "--json"],
        "cul8er tenant list": [cul8er, "tenant", "list"],
        "cul8er workflow show --json": [cul8er, "workflow", "show", RUN, "--json"],
        "cul8er workflow list --json": [cul8er, "workflow", "list", "--json"],
        "cul8er invoice list --json": [cul8er, "invoice", "list", "--json"],
        "cul8er usage show --json": [cul8er, "usage", "show", TENANT, "--json"],
        "cul8er plugin list --json": [cul8er, "plugin", "list", "--json"],
    }


def report(measured: dict[str, list[float]]) -> None:
    """Each command's figures, then one table of them all."""
    base = statistics.median(measured[BASELINE])
    rows = []
    for name, times in measured.items():
        ordered = sorted(times)
        p50 = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        rows.append(f"{name:<30}{p50:>8.3f}{p90:>8.3f}{p50 / base:>17.2f}")
        emit(
            name,
            {
                "runs": len(times),
                "p50_s": round(p50, 3),
                "p90_s": round(p90, 3),
                "ratio_to_celery_help_p50": round(p50 / base, 2),
            },
        )
    print(f"\n{'command':<30}{'p50 s':>8}{'p90 s':>8}{'x celery --help':>17}")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="cul8er-bench-cli-") as data_dir,
        database(args.database) as url,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
        env["CUL8ER_DATA_DIR"] = data_dir
        if url:
            env["CUL8ER_DATABASE_URL"] = url
        subprocess.run(
            [str(BIN / "cul8er"), "db", "upgrade"], env=env, check=True, capture_output=True
        )
        seed(url or f"sqlite:///{Path(data_dir).resolve() / 'cul8er.db'}")
        listed = commands()
        # Warm the file cache once, then measure.
        for command in listed.values():
            subprocess.run(command, env=env, capture_output=True, check=False, timeout=60)
        measured = wall_times(listed, env, args.runs)
    report(measured)


if __name__ == "__main__":
    main()
