"""The ``cul8er`` command line: run the stack, drive tenants, read the ledger.

Tables for people, ``--json`` for scripts. Commands that change something
enqueue the public task by name, exactly as another service would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table
from sqlalchemy import select

from workers.cli.economics import autoscale_cli, beat_cli, invoice_cli, usage_cli
from workers.cli.plugins import plugin_cli
from workers.cli.workers import workers_cli
from workers.runtime.db import session_scope
from workers.runtime.embedded import EmbeddedRedis
from workers.runtime.errors import Cul8erError
from workers.runtime.logging import configure_logging
from workers.runtime.models import Tenant, WorkflowRun
from workers.runtime.queues import WORKER_QUEUES
from workers.runtime.settings import get_settings

__all__ = ["cli", "main"]

cli = typer.Typer(help="cul8er: the tenant control plane on Celery.", no_args_is_help=True)
tenant_cli = typer.Typer(help="Create and change tenants.", no_args_is_help=True)
workflow_cli = typer.Typer(help="Read the workflow ledger.", no_args_is_help=True)
db_cli = typer.Typer(help="Database migrations.", no_args_is_help=True)
schema_cli = typer.Typer(help="JSON Schemas of the public tasks.", no_args_is_help=True)
cli.add_typer(tenant_cli, name="tenant")
cli.add_typer(workflow_cli, name="workflow")
cli.add_typer(db_cli, name="db")
cli.add_typer(schema_cli, name="schema")
platform_cli = typer.Typer(help="Compare platforms with the database.", no_args_is_help=True)
cli.add_typer(platform_cli, name="platform")
cli.add_typer(plugin_cli, name="plugin")
cli.add_typer(usage_cli, name="usage")
cli.add_typer(invoice_cli, name="invoice")
cli.add_typer(autoscale_cli, name="autoscale")
cli.add_typer(beat_cli, name="beat")
cli.add_typer(workers_cli)  # adds the `workers` command itself

console = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Follow the workflow until it ends.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for a worker's answer.")]

#: Statuses after which a run never changes.
FINAL = ("succeeded", "failed")


def _emit(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def _call(task: str, kwargs: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Enqueue a public task by name and wait for its answer."""
    from workers.app import app

    try:
        result: dict[str, Any] = app.send_task(task, kwargs=kwargs).get(timeout=timeout)
    except TimeoutError:
        err.print(
            f"[red]no answer from a worker within {timeout:.0f} s[/] (is `cul8er up` running?)"
        )
        raise typer.Exit(2) from None
    return result


def _fail_on_error(result: dict[str, Any], as_json: bool) -> None:
    if result.get("ok"):
        return
    if as_json:
        _emit(result)
    else:
        error = result.get("error", {})
        err.print(f"[red]{error.get('code')}[/]: {error.get('message')}")
    raise typer.Exit(1)


def _follow(run_id: str, *, as_json: bool, timeout: float) -> dict[str, Any]:
    """Poll the ledger until the run ends, with a progress bar for people."""
    from tasks.maintenance import describe_run

    deadline = time.monotonic() + timeout
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=err,
        disable=as_json,
    )
    with progress:
        bar = progress.add_task("starting", total=None)
        while True:
            with session_scope() as session:
                run = session.get(WorkflowRun, run_id)
                if run is None:
                    raise typer.Exit(1)
                view = describe_run(session, run)
            steps = [s for s in view["steps"] if s["phase"] == view["phase"]]
            done = sum(s["status"] in ("done", "failed") for s in steps)
            label = f"{view['kind']} [{view['status']}] {view['current_step'] or ''}"
            progress.update(bar, description=label, total=len(steps), completed=done)
            if view["status"] in FINAL or time.monotonic() > deadline:
                return view
            time.sleep(0.25)


def _mutate(
    task: str, kwargs: dict[str, Any], *, wait: bool, as_json: bool, timeout: float
) -> None:
    result = _call(task, kwargs, timeout=30.0)
    _fail_on_error(result, as_json)
    if not wait:
        if as_json:
            _emit(result)
        else:
            console.print(
                f"workflow [bold]{result['workflow_id']}[/] started for {result['tenant_id']}"
            )
        return
    view = _follow(result["workflow_id"], as_json=as_json, timeout=timeout)
    if as_json:
        _emit(view)
    else:
        _print_run(view)
    if view["status"] != "succeeded":
        raise typer.Exit(1)


# -- stack ------------------------------------------------------------------------------------


@cli.command()
def up(
    flower: Annotated[bool, typer.Option(help="Also run Flower on 127.0.0.1.")] = False,
    flower_port: int = 5555,
    concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    sandbox: Annotated[
        bool, typer.Option(help="Also run the sandbox worker for untrusted plugins.")
    ] = True,
) -> None:
    """Run a worker and beat (and Flower) on the configured broker and database."""
    from workers.runtime.migrate import upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    embedded = EmbeddedRedis(settings.data_dir)
    if settings.embedded_broker:
        embedded.ensure_running()
    upgrade(settings.sqlalchemy_url)
    celery = [sys.executable, "-m", "celery", "-A", "workers.app"]
    commands = {
        "worker": [
            *celery,
            "worker",
            "-Q",
            WORKER_QUEUES,
            "-c",
            str(concurrency),
            "-n",
            "cul8er@%h",
            "--loglevel",
            settings.log_level,
        ],
        "beat": [*celery, "beat", "--loglevel", settings.log_level],
    }
    if sandbox:
        # Untrusted plugins only ever run here, under the sandbox's time, memory and CPU limits.
        commands["sandbox"] = [
            *celery,
            "worker",
            "-Q",
            settings.sandbox_queue,
            "-c",
            "1",
            "-n",
            "cul8er-sandbox@%h",
            "--loglevel",
            settings.log_level,
        ]
    if flower:
        commands["flower"] = [*celery, "flower", "--address=127.0.0.1", f"--port={flower_port}"]
    children = {name: subprocess.Popen(cmd) for name, cmd in commands.items()}
    err.print(f"[green]cul8er up[/]: {', '.join(children)} running; data in {settings.data_dir}")
    if flower:
        err.print(f"Flower: http://127.0.0.1:{flower_port}")
    stopping = False

    def _stop(*_args: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    code = 0
    try:
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    err.print(f"[red]{name} exited with {child.returncode}[/]")
                    stopping, code = True, 1
            time.sleep(0.5)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.terminate()
        for child in children.values():
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        if settings.embedded_broker:
            # `up` owns the embedded broker's life, whoever happened to start it first.
            embedded.stop()
    raise typer.Exit(code)


@cli.command()
def down() -> None:
    """Stop the embedded broker (workers should be stopped first)."""
    stopped = EmbeddedRedis(get_settings().data_dir).stop()
    console.print("embedded broker stopped" if stopped else "embedded broker was not running")


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Migrate the database to the newest schema."""
    from workers.runtime.migrate import upgrade

    settings = get_settings()
    upgrade(settings.sqlalchemy_url, revision)
    console.print(f"database at {revision}")


@schema_cli.command("export")
def schema_export(directory: Path) -> None:
    """Write one JSON Schema per public task into DIRECTORY."""
    from schemas.tasks import PUBLIC_TASKS

    directory.mkdir(parents=True, exist_ok=True)
    for name, model in PUBLIC_TASKS.items():
        schema = {"$id": name, "title": name, **model.model_json_schema()}
        (directory / f"{name}.json").write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    console.print(f"wrote {len(PUBLIC_TASKS)} schemas to {directory}")


@platform_cli.command("reconcile")
def platform_reconcile(
    prune: Annotated[bool, typer.Option(help="Destroy orphaned instances.")] = False,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 300.0,
) -> None:
    """Recreate missing instances; report orphans (destroy them with --prune)."""
    from workers.app import app

    report: dict[str, list[dict[str, Any]]] = app.send_task(
        "cul8er.platforms.reconcile", kwargs={"prune": prune}
    ).get(timeout=timeout)
    if as_json:
        _emit(report)
        return
    table = Table("finding", "platform", "instance", "tenant", "error")
    for kind, entries in report.items():
        for e in entries:
            table.add_row(
                kind,
                e.get("platform", "-"),
                e.get("instance", "-"),
                e.get("tenant_id") or "-",
                e.get("error", ""),
            )
    console.print(table if table.row_count else "no drift")


# -- tenants ----------------------------------------------------------------------------------


@tenant_cli.command("create")
def tenant_create(
    name: str,
    plan: Annotated[str, typer.Option(help="Plan name from the catalog.")] = "starter",
    tenant_id: Annotated[
        str | None, typer.Option(help="Tenant id (default: from the name).")
    ] = None,
    platform: Annotated[str | None, typer.Option(help="Platform (default from settings).")] = None,
    idempotency_key: str | None = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 300.0,
) -> None:
    """Sign a tenant up on a plan."""
    kwargs: dict[str, Any] = {"name": name, "plan": plan}
    for key, value in (
        ("tenant_id", tenant_id),
        ("platform", platform),
        ("idempotency_key", idempotency_key),
    ):
        if value is not None:
            kwargs[key] = value
    _mutate("cul8er.tenants.create", kwargs, wait=wait, as_json=as_json, timeout=timeout)


@tenant_cli.command("change-plan")
def tenant_change_plan(
    tenant_id: str,
    plan: str,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 300.0,
) -> None:
    """Move a tenant to another plan."""
    kwargs = {"tenant_id": tenant_id, "plan": plan}
    _mutate("cul8er.tenants.change_plan", kwargs, wait=wait, as_json=as_json, timeout=timeout)


@tenant_cli.command("suspend")
def tenant_suspend(
    tenant_id: str,
    reason: str = "",
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 300.0,
) -> None:
    """Stop a tenant's instances, keeping its data."""
    kwargs = {"tenant_id": tenant_id, "reason": reason}
    _mutate("cul8er.tenants.suspend", kwargs, wait=wait, as_json=as_json, timeout=timeout)


@tenant_cli.command("resume")
def tenant_resume(
    tenant_id: str,
    reason: str = "",
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 300.0,
) -> None:
    """Start a suspended tenant again."""
    kwargs = {"tenant_id": tenant_id, "reason": reason}
    _mutate("cul8er.tenants.resume", kwargs, wait=wait, as_json=as_json, timeout=timeout)


@tenant_cli.command("delete")
def tenant_delete(
    tenant_id: str, wait: WaitOpt = False, as_json: JsonOpt = False, timeout: TimeoutOpt = 300.0
) -> None:
    """Deprovision a tenant: instances, data store and subnet go."""
    kwargs = {"tenant_id": tenant_id}
    _mutate("cul8er.tenants.deprovision", kwargs, wait=wait, as_json=as_json, timeout=timeout)


@tenant_cli.command("list")
def tenant_list(
    status: Annotated[str | None, typer.Option(help="Only tenants in this status.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every tenant, newest first."""
    with session_scope() as session:
        query = select(Tenant).order_by(Tenant.created_at.desc())
        if status:
            query = query.where(Tenant.status == status)
        rows: list[dict[str, Any]] = [
            {
                "tenant_id": t.id,
                "name": t.name,
                "plan": t.plan,
                "status": t.status,
                "platform": t.platform,
                "subnet": t.resources.get("subnet"),
                "created_at": t.created_at.isoformat(),
            }
            for t in session.scalars(query)
        ]
    if as_json:
        _emit(rows)
        return
    table = Table("tenant", "name", "plan", "status", "platform", "subnet", "created")
    for r in rows:
        table.add_row(
            r["tenant_id"],
            r["name"],
            r["plan"],
            r["status"],
            r["platform"],
            r["subnet"] or "-",
            r["created_at"][:19],
        )
    console.print(table)


@tenant_cli.command("show")
def tenant_show(tenant_id: str, as_json: JsonOpt = False) -> None:
    """One tenant: status, plan, subnet, instances."""
    from tasks.tenants import describe_tenant

    with session_scope() as session:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None:
            err.print(f"[red]not_found[/]: tenant {tenant_id!r} does not exist")
            raise typer.Exit(1)
        view = describe_tenant(session, tenant)
    if as_json:
        _emit(view)
        return
    console.print(
        f"[bold]{view['tenant_id']}[/] ({view['name']}): {view['status']} on "
        f"{view['plan']}, {view['platform']}, subnet {view['subnet'] or '-'}"
    )
    if view["status_reason"]:
        console.print(f"reason: {view['status_reason']}")
    table = Table("instance", "status", "endpoint", "limits applied")
    for i in view["instances"]:
        table.add_row(
            i["name"], i["status"], i["endpoint"] or "-", json.dumps(i["limits"].get("applied", {}))
        )
    console.print(table)


# -- workflows --------------------------------------------------------------------------------


@workflow_cli.command("list")
def workflow_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's runs.")] = None,
    status: Annotated[str | None, typer.Option(help="Only runs in this status.")] = None,
    limit: int = 50,
    as_json: JsonOpt = False,
) -> None:
    """Workflow runs, newest first."""
    with session_scope() as session:
        query = select(WorkflowRun).order_by(WorkflowRun.created_at.desc()).limit(limit)
        if tenant:
            query = query.where(WorkflowRun.tenant_id == tenant)
        if status:
            query = query.where(WorkflowRun.status == status)
        rows: list[dict[str, Any]] = [
            {
                "workflow_id": r.id,
                "kind": r.kind,
                "tenant_id": r.tenant_id,
                "status": r.status,
                "current_step": r.current_step,
                "created_at": r.created_at.isoformat(),
                "error": (r.error or {}).get("message"),
            }
            for r in session.scalars(query)
        ]
    if as_json:
        _emit(rows)
        return
    table = Table("workflow", "kind", "tenant", "status", "step", "created", "error")
    for r in rows:
        table.add_row(
            r["workflow_id"],
            r["kind"],
            r["tenant_id"] or "-",
            r["status"],
            r["current_step"] or "-",
            r["created_at"][:19],
            (r["error"] or "")[:60],
        )
    console.print(table)


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


def _print_run(view: dict[str, Any]) -> None:
    console.print(
        f"[bold]{view['workflow_id']}[/] {view['kind']} tenant={view['tenant_id']} "
        f"status=[bold]{view['status']}[/]"
    )
    if view["error"]:
        error = view["error"]
        console.print(
            f"[red]error[/] in {error.get('step')}: {error.get('code')}: {error.get('message')}"
        )
        for extra in error.get("compensation_errors", []):
            console.print(f"[red]compensation error[/] in {extra['step']}: {extra['message']}")
    table = Table("phase", "step", "status", "attempts")
    # Folded, never cut short: node names and pids stay whole in a narrow terminal.
    table.add_column("owner", overflow="fold")
    table.add_column("takeovers", overflow="fold")
    table.add_column("started")
    table.add_column("finished")
    table.add_column("error", overflow="fold")
    for s in view["steps"]:
        table.add_row(
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
    console.print(table)
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
        line = [at[11:23] or "-", f"{phase}/{step}", str(entry.get("event"))]
        if entry.get("reason"):
            line.append(f"reason={entry['reason']}")
        if entry.get("attempt") is not None:
            line.append(f"attempt={entry['attempt']}")
        if entry.get("event") == "takeover":
            line.append(f"previous_owner={_who(entry.get('previous_owner'))}")
        if entry.get("owner"):
            line.append(f"owner={str(entry['owner'])[:8]}")
        if entry.get("silent_for") is not None:
            line.append(f"silent_for={entry['silent_for']:.1f}s")
        if entry.get("by"):
            line.append(f"by={entry['by']}")
        console.print("  " + " ".join(line), markup=False, highlight=False, soft_wrap=True)


@workflow_cli.command("show")
def workflow_show(workflow_id: str, as_json: JsonOpt = False) -> None:
    """One run: each step's status, attempts, owner and takeovers, then the steps' history."""
    from tasks.maintenance import describe_run

    with session_scope() as session:
        run = session.get(WorkflowRun, workflow_id)
        if run is None:
            err.print(f"[red]not_found[/]: workflow {workflow_id} does not exist")
            raise typer.Exit(1)
        view = describe_run(session, run)
    if as_json:
        _emit(view)
    else:
        _print_run(view)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    settings = get_settings()
    # Logs go to stderr, so --json output on stdout stays parseable.
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    try:
        cli()
    except Cul8erError as exc:
        hint = ""
        if "no such table" in str(exc) or "does not exist" in str(exc):
            hint = " (has the database been migrated? run `cul8er db upgrade`)"
        err.print(f"[red]{exc.code}[/]: {exc}{hint}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
