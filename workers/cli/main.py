"""The ``cul8er`` command line: run the stack, drive tenants, read the ledger.

Tables for people, ``--json`` for scripts. Commands that change something enqueue the public
task by name, exactly as another service would. Each command group lives in its own module,
imported only when that group runs (:class:`LazyGroup`): ``cul8er --help`` imports none of
them, and ``cul8er tenant list`` imports the tenant commands alone.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, Final

import typer

# typer (0.29+) builds its commands on the click it ships: the classes a group holds must be
# those, not the separately installed click's.
from typer import _click as click
from typer.core import TyperCommand, TyperGroup

from workers.runtime.errors import Cul8erError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["COMMANDS", "LazyGroup", "cli", "main"]

#: Each command: (module, its Typer app, the command inside that app or ``None`` for the app
#: itself as a group, the one-line help ``cul8er --help`` shows without importing it).
COMMANDS: Final[dict[str, tuple[str, str, str | None, str]]] = {
    "up": (
        "workers.cli.stack",
        "stack_cli",
        "up",
        "Run a worker and beat (and Flower, and the HTTP API) on the configured broker and "
        "database.",
    ),
    "down": (
        "workers.cli.stack",
        "stack_cli",
        "down",
        "Stop the embedded broker (workers should be stopped first).",
    ),
    "tenant": ("workers.cli.tenants", "tenant_cli", None, "Create and change tenants."),
    "deploy": ("workers.cli.deploy", "deploy_cli", None, "Roll releases over tenants' instances."),
    "api": ("workers.cli.api", "api_cli", None, "The HTTP API (/api/v1): serve it, issue tokens."),
    "workflow": ("workers.cli.runs", "workflow_cli", None, "Read the workflow ledger."),
    "db": ("workers.cli.maintenance", "db_cli", None, "Database migrations."),
    "schema": ("workers.cli.maintenance", "schema_cli", None, "JSON Schemas of the public tasks."),
    "platform": (
        "workers.cli.maintenance",
        "platform_cli",
        None,
        "Compare platforms with the database.",
    ),
    "plugin": (
        "workers.cli.plugins",
        "plugin_cli",
        None,
        "Plugins: list, validate, install, enable, reload.",
    ),
    "usage": ("workers.cli.economics", "usage_cli", None, "Metered usage per tenant."),
    "invoice": (
        "workers.cli.economics",
        "invoice_cli",
        None,
        "Invoices of closed billing periods.",
    ),
    "autoscale": ("workers.cli.economics", "autoscale_cli", None, "Autoscale decisions and why."),
    "beat": ("workers.cli.economics", "beat_cli", None, "The beat schedule and its last runs."),
    "workers": (
        "workers.cli.workers",
        "workers_cli",
        "workers",
        "Worker processes by node: alive, silent, lost or stopped, and the steps each runs.",
    ),
}


def load_command(name: str) -> click.Command:
    """The click command ``name``, its module imported now.

    Built as ``add_typer`` on the root always built it: a one-command app stays a group
    (``cul8er db upgrade``), an app without a name lends its commands (``cul8er up``).
    """
    module, attr, inner, _ = COMMANDS[name]
    app = getattr(importlib.import_module(module), attr)
    parent = typer.Typer()
    if inner is None:
        parent.add_typer(app, name=name)
    else:
        parent.add_typer(app)
    group = typer.main.get_command(parent)
    assert isinstance(group, TyperGroup)
    found = group.get_command(click.Context(group), inner or name)
    assert found is not None, f"{module}.{attr} has no command {inner or name!r}"
    return found


class LazyGroup(TyperGroup):
    """The root group: each command's module is imported when that command runs."""

    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *COMMANDS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        if self._listing:
            # The root's help lists names and one-liners: nothing is imported for it.
            return TyperCommand(cmd_name, help=COMMANDS[cmd_name][3], callback=lambda: None)
        return load_command(cmd_name)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def invoke(self, ctx: click.Context) -> Any:
        _configure_logging()
        return super().invoke(ctx)


cli = typer.Typer(
    cls=LazyGroup, help="cul8er: the tenant control plane on Celery.", no_args_is_help=True
)


@cli.callback()
def _root() -> None:
    """cul8er: the tenant control plane on Celery."""


def _configure_logging() -> None:
    from workers.runtime.essentials import essentials
    from workers.runtime.logging import configure_logging

    settings = essentials()
    # Logs go to stderr, so --json output on stdout stays parseable. Lazily: most commands
    # log nothing, and structlog is imported only once something needs it.
    configure_logging(fmt=settings.log_format, level=settings.log_level, lazy=True)


def _hint(exc: Cul8erError) -> str:
    """What to try when an error looks like an unmigrated database."""
    if "no such table" in str(exc) or "does not exist" in str(exc):
        return " (has the database been migrated? run `cul8er db upgrade`)"
    return ""


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        cli(args=list(argv) if argv is not None else None)
    except Cul8erError as exc:
        from workers.cli.console import complain

        complain((exc.code, "red"), f": {exc}{_hint(exc)}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
