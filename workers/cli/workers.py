"""``cul8er workers``: the processes that run steps, whether they are alive, and what they hold.

Reads the ``workers`` table (each pool process's heartbeat) and the running steps
each process owns; needs no worker to answer.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer
from rich.table import Table
from rich.text import Text
from sqlalchemy import or_, select

from schemas.states import StepStatus
from workers.cli.console import JsonOpt, add_row, console, emit, line
from workers.runtime.db import session_scope
from workers.runtime.models import StepRun, WorkerProcess, WorkflowRun, utcnow
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy import Select
    from sqlalchemy.orm import Session

__all__ = ["RECENT", "worker_state", "workers_cli", "workers_view"]

#: Holds the one ``workers`` command; ``cul8er`` adds it without a group name.
workers_cli = typer.Typer(help="Worker processes: alive, silent, lost, and the steps they hold.")

#: Lost and stopped processes stay listed this long without ``--all`` (seconds).
RECENT: Final = 3600.0
#: A process holding more running steps than this shows their count only.
HOLDS_SHOWN: Final = 3


def worker_state(worker: WorkerProcess, *, now: dt.datetime, owner_timeout: float) -> str:
    """``alive``, ``silent`` (no beat, not yet marked by reconcile), ``lost`` or ``stopped``."""
    if worker.stopped_at is not None:
        return "stopped"
    if worker.lost_at is not None:
        return "lost"
    if (now - worker.beat_at).total_seconds() <= owner_timeout:
        return "alive"
    return "silent"


def _listed(now: dt.datetime, include_all: bool) -> Select[Any]:
    """The query for the processes to list: all, or the live and the recently gone."""
    query = select(WorkerProcess).order_by(WorkerProcess.node, WorkerProcess.started_at)
    if include_all:
        return query
    cutoff = now - dt.timedelta(seconds=RECENT)
    return query.where(
        or_(
            WorkerProcess.stopped_at >= cutoff,
            WorkerProcess.stopped_at.is_(None)
            & or_(WorkerProcess.lost_at.is_(None), WorkerProcess.lost_at >= cutoff),
        )
    )


def _held_steps(
    session: Session, workers: Sequence[WorkerProcess]
) -> dict[str, list[dict[str, Any]]]:
    """The running steps each of ``workers`` owns, by boot id, oldest first."""
    holds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if not workers:
        return holds
    held = session.execute(
        select(
            StepRun.owner_id,
            StepRun.run_id,
            StepRun.name,
            StepRun.attempts,
            StepRun.heartbeat_at,
            WorkflowRun.tenant_id,
        )
        .join(WorkflowRun, WorkflowRun.id == StepRun.run_id)
        .where(
            StepRun.owner_id.in_([w.boot_id for w in workers]),
            StepRun.status == StepStatus.RUNNING.value,
        )
        .order_by(StepRun.started_at)
    ).all()
    for row in held:
        holds[str(row.owner_id)].append(
            {
                "workflow_id": row.run_id,
                "step": row.name,
                "tenant_id": row.tenant_id,
                "attempts": row.attempts,
                "heartbeat_at": _iso(row.heartbeat_at),
            }
        )
    return holds


def workers_view(
    session: Session,
    *,
    owner_timeout: float,
    include_all: bool = False,
    now: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """Worker processes by node, each with its state and the running steps it owns.

    Without ``include_all``: the alive and silent ones, and those lost or stopped
    within :data:`RECENT` seconds.
    """
    now = now or utcnow()
    workers: Sequence[WorkerProcess] = session.scalars(_listed(now, include_all)).all()
    holds = _held_steps(session, workers)
    return [
        {
            "node": w.node,
            "host": w.host,
            "pid": w.pid,
            "boot_id": w.boot_id,
            "state": worker_state(w, now=now, owner_timeout=owner_timeout),
            "beat_at": _iso(w.beat_at),
            "age_seconds": round((now - w.beat_at).total_seconds(), 1),
            "started_at": _iso(w.started_at),
            "stopped_at": _iso(w.stopped_at),
            "lost_at": _iso(w.lost_at),
            "holds": holds.get(w.boot_id, []),
        }
        for w in workers
    ]


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _holds(held: list[dict[str, Any]]) -> str:
    if not held:
        return "-"
    if len(held) > HOLDS_SHOWN:
        return f"{len(held)} steps"
    return ", ".join(f"{h['workflow_id'][:8]} {h['step'].rsplit('.', 1)[-1]}" for h in held)


_STATE_STYLE: Final = {"alive": "green", "silent": "yellow", "lost": "red", "stopped": "dim"}


@workers_cli.command("workers")
def workers_list(
    include_all: Annotated[
        bool, typer.Option("--all", help="Every process ever recorded, however old.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Worker processes by node: alive, silent, lost or stopped, and the steps each runs.

    Without --all: the alive and silent ones, and those lost or stopped in the last hour.
    """
    settings = get_settings()
    with session_scope() as session:
        rows = workers_view(session, owner_timeout=settings.owner_timeout, include_all=include_all)
    if as_json:
        emit(rows)
        return
    if not rows:
        console.print("no worker processes" + ("" if include_all else " (try --all)"))
        return
    table = Table("NODE", "PID", "BOOT", "STATE", "LAST BEAT", "HOLDS")
    node = None
    for r in rows:
        if node is not None and r["node"] != node:
            table.add_section()
        add_row(
            table,
            r["node"] if r["node"] != node else "",
            str(r["pid"]),
            r["boot_id"][:8],
            Text(r["state"], style=_STATE_STYLE[r["state"]]),
            f"{r['age_seconds']:.1f}s ago",
            _holds(r["holds"]),
        )
        node = r["node"]
    console.print(table)
    console.print(
        line(f"alive: a beat within {settings.owner_timeout:g} s; silent: none since, not yet lost")
    )
