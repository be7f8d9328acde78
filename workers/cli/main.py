"""The ``cul8er`` command line: run the stack, drive tenants, read the ledger.

Tables for people, ``--json`` for scripts. Commands that change something
enqueue the public task by name, exactly as another service would. Each group lives in
its own module; this one puts them together and holds the small ``db``, ``schema`` and
``platform`` groups.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from workers.cli.api import api_cli
from workers.cli.client import call
from workers.cli.console import JsonOpt, add_row, complain, console, emit, line
from workers.cli.deploy import deploy_cli
from workers.cli.economics import autoscale_cli, beat_cli, invoice_cli, usage_cli
from workers.cli.plugins import plugin_cli
from workers.cli.runs import workflow_cli
from workers.cli.stack import stack_cli
from workers.cli.tenants import TimeoutOpt, tenant_cli
from workers.cli.workers import workers_cli
from workers.runtime.errors import Cul8erError
from workers.runtime.logging import configure_logging
from workers.runtime.settings import get_settings

__all__ = ["cli", "main"]

cli = typer.Typer(help="cul8er: the tenant control plane on Celery.", no_args_is_help=True)
db_cli = typer.Typer(help="Database migrations.", no_args_is_help=True)
schema_cli = typer.Typer(help="JSON Schemas of the public tasks.", no_args_is_help=True)
platform_cli = typer.Typer(help="Compare platforms with the database.", no_args_is_help=True)
cli.add_typer(stack_cli)  # adds `up` and `down` themselves
cli.add_typer(tenant_cli, name="tenant")
cli.add_typer(deploy_cli, name="deploy")
cli.add_typer(api_cli, name="api")
cli.add_typer(workflow_cli, name="workflow")
cli.add_typer(db_cli, name="db")
cli.add_typer(schema_cli, name="schema")
cli.add_typer(platform_cli, name="platform")
cli.add_typer(plugin_cli, name="plugin")
cli.add_typer(usage_cli, name="usage")
cli.add_typer(invoice_cli, name="invoice")
cli.add_typer(autoscale_cli, name="autoscale")
cli.add_typer(beat_cli, name="beat")
cli.add_typer(workers_cli)  # adds the `workers` command itself


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Migrate the database to the newest schema."""
    from workers.runtime.migrate import upgrade

    settings = get_settings()
    upgrade(settings.sqlalchemy_url, revision)
    console.print(line(f"database at {revision}"))


@schema_cli.command("export")
def schema_export(directory: Path) -> None:
    """Write one JSON Schema per public task into DIRECTORY."""
    from schemas.tasks import PUBLIC_TASKS

    directory.mkdir(parents=True, exist_ok=True)
    for name, model in PUBLIC_TASKS.items():
        schema = {"$id": name, "title": name, **model.model_json_schema()}
        (directory / f"{name}.json").write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    console.print(line(f"wrote {len(PUBLIC_TASKS)} schemas to {directory}"))


@platform_cli.command("reconcile")
def platform_reconcile(
    prune: Annotated[bool, typer.Option(help="Destroy orphaned instances.")] = False,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 300.0,
) -> None:
    """Recreate missing instances; report orphans (destroy them with --prune)."""
    report: dict[str, list[dict[str, Any]]] = call(
        "cul8er.platforms.reconcile", {"prune": prune}, timeout=timeout
    )
    if as_json:
        emit(report)
        return
    table = Table("finding", "platform", "instance", "tenant", "error")
    for kind, entries in report.items():
        for e in entries:
            add_row(
                table,
                kind,
                e.get("platform", "-"),
                e.get("instance", "-"),
                e.get("tenant_id") or "-",
                e.get("error", ""),
            )
    console.print(table if table.row_count else "no drift")


def _hint(exc: Cul8erError) -> str:
    """What to try when an error looks like an unmigrated database."""
    if "no such table" in str(exc) or "does not exist" in str(exc):
        return " (has the database been migrated? run `cul8er db upgrade`)"
    return ""


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    settings = get_settings()
    # Logs go to stderr, so --json output on stdout stays parseable.
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    try:
        cli()
    except Cul8erError as exc:
        complain((exc.code, "red"), f": {exc}{_hint(exc)}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
