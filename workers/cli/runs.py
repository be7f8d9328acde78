"""``cul8er workflow list|show``, and following a run to its end with a progress bar.

A run is printed as its steps (status, attempts, owner, takeovers) and then the steps'
history in time order; ``--json`` prints ``describe_run``'s view as it is.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import typer
from rich.table import Table

from schemas.states import FINAL_RUN, FINISHED, RunStatus
from workers.cli.console import JsonOpt, add_row, console, emit, err, line
from workers.cli.reads import reader
from workers.cli.views import describe_run, list_runs
from workers.runtime.waiting import wait_until

__all__ = ["follow", "print_run", "read_run", "succeeded", "workflow_cli"]

workflow_cli = typer.Typer(help="Read the workflow ledger.", no_args_is_help=True)

#: How often ``--wait`` reads the ledger (seconds).
FOLLOW_INTERVAL = 0.25


def read_run(workflow_id: str) -> dict[str, Any]:
    """The run as ``cul8er.workflows.status`` answers it (exit code 1 if there is none)."""
    with reader() as read:
        return describe_run(read, workflow_id)


def follow(run_id: str, *, as_json: bool, timeout: float) -> dict[str, Any]:
    """Read the run until it ends or ``timeout`` passes; its last view. A bar for people."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

    progress = Progress(
        SpinnerColumn(),
        # The label holds data (the status in brackets): shown as it is, not as markup.
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=err,
        disable=as_json,
    )
    seen: list[dict[str, Any]] = []

    def ended() -> bool:
        view = read_run(run_id)
        seen.append(view)
        steps = [s for s in view["steps"] if s["phase"] == view["phase"]]
        done = sum(s["status"] in FINISHED for s in steps)
        label = f"{view['kind']} [{view['status']}] {view['current_step'] or ''}"
        progress.update(bar, description=label, total=len(steps), completed=done)
        return view["status"] in FINAL_RUN

    with progress:
        bar = progress.add_task("starting", total=None)
        # Past the timeout the caller gets the run as it is, still going.
        with contextlib.suppress(TimeoutError):
            wait_until(ended, timeout=timeout, interval=FOLLOW_INTERVAL, message="the run")
    return seen[-1]


def succeeded(view: dict[str, Any]) -> bool:
    """Whether the run ended well."""
    return bool(view["status"] == RunStatus.SUCCEEDED)


def _who(owner: dict[str, Any] | None) -> str:
    """A step owner as ``node pid N``; its boot id when the process row is gone."""
    if not owner:
        return "-"
    if owner.get("node") is None:
        return f"boot {str(owner.get('boot_id'))[:8]}"
    return f"{owner['node']} pid {owner['pid']}"


def _takeovers(takeovers: list[dict[str, Any]]) -> str:
    """How many times a step was taken over, with the reason and victim of the last one."""
    if not takeovers:
        return "-"
    last = takeovers[-1]
    detail = [str(last.get("reason"))]
    if last.get("silent_for") is not None:
        detail[0] += f" {last['silent_for']:.1f}s"
    if last.get("previous_owner"):
        detail.append(f"from {_who(last['previous_owner'])}")
    prefix = "last " if len(takeovers) > 1 else ""
    return f"{len(takeovers)} ({prefix}{', '.join(detail)})"


def _print_heading(view: dict[str, Any]) -> None:
    """The run's id, kind, tenant and status, and its error with any compensation errors."""
    console.print(
        line(
            (view["workflow_id"], "bold"),
            f" {view['kind']} tenant={view['tenant_id']} status=",
            (view["status"], "bold"),
        )
    )
    error = view["error"]
    if not error:
        return
    console.print(
        line(
            ("error", "red"),
            f" in {error.get('step')}: {error.get('code')}: {error.get('message')}",
        )
    )
    for extra in error.get("compensation_errors", []):
        console.print(
            line(("compensation error", "red"), f" in {extra['step']}: {extra['message']}")
        )


def _steps_table(steps: list[dict[str, Any]]) -> Table:
    """One row per step: status, attempts, owner, takeovers, times and error."""
    table = Table("phase", "step", "status", "attempts")
    # Folded, never cut short: node names and pids stay whole in a narrow terminal.
    table.add_column("owner", overflow="fold")
    table.add_column("takeovers", overflow="fold")
    table.add_column("started")
    table.add_column("finished")
    table.add_column("error", overflow="fold")
    for s in steps:
        add_row(
            table,
            s["phase"],
            s["name"].rsplit(".", 1)[-1],
            s["status"],
            str(s["attempts"]),
            _who(s.get("owner")),
            _takeovers(s.get("takeovers") or []),
            (s["started_at"] or "-")[11:23],
            (s["finished_at"] or "-")[11:23],
            ((s["error"] or {}).get("message") or "")[:80],
        )
    return table


def _history_line(at: str, phase: str, step: str, entry: dict[str, Any]) -> str:
    """One history entry: when, which step, what happened, and its details."""
    words = [at[11:23] or "-", f"{phase}/{step}", str(entry.get("event"))]
    if entry.get("reason"):
        words.append(f"reason={entry['reason']}")
    if entry.get("attempt") is not None:
        words.append(f"attempt={entry['attempt']}")
    if entry.get("event") == "takeover":
        words.append(f"previous_owner={_who(entry.get('previous_owner'))}")
    if entry.get("owner"):
        words.append(f"owner={str(entry['owner'])[:8]}")
    if entry.get("silent_for") is not None:
        words.append(f"silent_for={entry['silent_for']:.1f}s")
    if entry.get("by"):
        words.append(f"by={entry['by']}")
    return "  " + " ".join(words)


def print_run(view: dict[str, Any]) -> None:
    """A run for people: heading, the steps' table, then the steps' history in time order."""
    _print_heading(view)
    console.print(_steps_table(view["steps"]))
    entries = sorted(
        (
            (str(entry.get("at") or ""), s["phase"], s["name"].rsplit(".", 1)[-1], entry)
            for s in view["steps"]
            for entry in s.get("history") or []
        ),
        key=lambda item: item[0],
    )
    if not entries:
        return
    console.print("history:")
    for at, phase, step, entry in entries:
        console.print(
            _history_line(at, phase, step, entry), markup=False, highlight=False, soft_wrap=True
        )


@workflow_cli.command("list")
def workflow_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's runs.")] = None,
    status: Annotated[RunStatus | None, typer.Option(help="Only runs in this status.")] = None,
    limit: int = 50,
    as_json: JsonOpt = False,
) -> None:
    """Workflow runs, newest first."""
    with reader() as read:
        rows = list_runs(read, tenant=tenant, status=status.value if status else None, limit=limit)
    if as_json:
        emit(rows)
        return
    table = Table("workflow", "kind", "tenant", "status", "step", "created", "error")
    for r in rows:
        add_row(
            table,
            r["workflow_id"],
            r["kind"],
            r["tenant_id"] or "-",
            r["status"],
            r["current_step"] or "-",
            r["created_at"][:19],
            (r["error"] or "")[:60],
        )
    console.print(table)


@workflow_cli.command("show")
def workflow_show(workflow_id: str, as_json: JsonOpt = False) -> None:
    """One run: each step's status, attempts, owner and takeovers, then the steps' history."""
    view = read_run(workflow_id)
    if as_json:
        emit(view)
    else:
        print_run(view)
