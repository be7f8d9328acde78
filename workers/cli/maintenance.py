"""``cul8er db | schema | platform``: migrations, the tasks' JSON Schemas, platform drift."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from workers.cli.client import call
from workers.cli.console import JsonOpt, add_row, console, emit, line
from workers.cli.tenants import TimeoutOpt
from workers.runtime.settings import get_settings

__all__ = ["db_cli", "platform_cli", "schema_cli"]

db_cli = typer.Typer(help="Database migrations.", no_args_is_help=True)
schema_cli = typer.Typer(help="JSON Schemas of the public tasks.", no_args_is_help=True)
platform_cli = typer.Typer(help="Compare platforms with the database.", no_args_is_help=True)


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
