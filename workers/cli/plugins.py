"""``cul8er plugin …``: list, inspect, validate, scaffold, install, search, update, enable,
disable, reload."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table

from schemas.manifest import PluginType
from workers.cli.console import JsonOpt, add_row, complain, console, emit, fail, line
from workers.pluginhost import admin as plugin_admin
from workers.runtime.errors import Cul8erError
from workers.runtime.settings import get_settings

__all__ = ["plugin_cli"]

plugin_cli = typer.Typer(
    help="Plugins: list, validate, install, enable, reload.", no_args_is_help=True
)


def _print(data: dict[str, Any], as_json: bool) -> None:
    """``data`` as JSON, or one ``key: value`` line per entry for people."""
    if as_json:
        emit(data)
    else:
        for key, value in data.items():
            console.print(line((key, "bold"), f": {value}"))


def _composed() -> None:
    """Put cul8er together (the composition root, :mod:`workers.app`) before an action.

    An action emits ``plugin.state_changed``; only a process whose observer bus is
    subscribed to the engine's events hands it to the observers. Importing the root starts
    nothing, so commands that only read skip it and start faster.
    """
    importlib.import_module("workers.app")


def _refused(exc: Cul8erError, as_json: bool) -> NoReturn:
    """Exit with code 1 saying why the action was refused (as JSON with ``--json``)."""
    if as_json:
        emit({"ok": False, "error": exc.to_dict()})
        raise typer.Exit(1)
    raise fail("refused", str(exc))


@plugin_cli.command("list")
def plugin_list(as_json: JsonOpt = False) -> None:
    """Every plugin: version, type, state, queue, and why it failed."""
    from workers.pluginhost.registry import PluginRegistry

    registry = PluginRegistry(get_settings()).boot()
    rows = registry.status()
    if as_json:
        emit(rows)
        return
    for note in registry.notes:
        # Duplicates resolved by version, skipped folders, refused archives.
        complain(("note", "yellow"), f": {note}")
    table = Table("name", "version", "type", "state", "trusted", "queue", "error")
    for row in rows:
        add_row(
            table,
            row["name"],
            row["version"],
            row["type"],
            row["state"],
            "yes" if row["trusted"] else "no",
            row["queue"],
            (row["error"] or "")[:80],
        )
    console.print(table)


@plugin_cli.command("info")
def plugin_info(name: str, as_json: JsonOpt = False) -> None:
    """One plugin: its manifest, state, operations and config (secrets stay references)."""
    from workers.pluginhost.contracts import operations
    from workers.pluginhost.registry import PluginRegistry

    registry = PluginRegistry(get_settings()).boot()
    rows = {row["name"]: row for row in registry.status()}
    if name not in rows:
        raise fail("not_found", f"no plugin {name!r}; installed: {', '.join(sorted(rows))}")
    view = dict(rows[name])
    served = registry.served.get(name)
    if served is not None:
        manifest = served.loaded.manifest
        view.update(
            description=manifest.description,
            permissions=sorted(p.value for p in manifest.permissions),
            requires=[r.model_dump() for r in manifest.requires],
            operations=[f"plugins.{name}.{op}" for op in operations(manifest.type)],
            config=served.config,
            config_schema=served.loaded.config_model.model_json_schema()
            if served.loaded.config_model
            else None,
        )
        versions = _who_runs(registry, name)
        view["versions"] = (
            versions
            if as_json
            else "; ".join(
                f"{v['version']}: {v['tenants']} tenant(s)"
                + (f" ({v['serves']})" if v["serves"] else "")
                for v in versions
            )
        )
    _print(view, as_json)


def _who_runs(registry: Any, name: str) -> list[dict[str, Any]]:
    """Each installed version of ``name`` and how many tenants run it."""
    from sqlalchemy import func, select

    from schemas.states import TenantStatus
    from workers.pluginhost.tenancy import version_counts
    from workers.runtime.db import session_scope
    from workers.runtime.models import Tenant

    fleet = registry.served[name].loaded.version
    with session_scope() as session:
        pinned = version_counts(session, name)
        tenants = int(
            session.scalar(
                select(func.count())
                .select_from(Tenant)
                .where(Tenant.status != TenantStatus.TERMINATED)
            )
            or 0
        )
    on_fleet = tenants - sum(count for version, count in pinned.items() if version)
    return [
        {
            "version": version,
            "serves": "every tenant not pinned" if version == fleet else "",
            "tenants": on_fleet if version == fleet else pinned.get(version, 0),
        }
        for version in registry.installed_versions(name)
    ]


@plugin_cli.command("validate")
def plugin_validate(path: Path, as_json: JsonOpt = False) -> None:
    """Run every check on a plugin folder (or the package root `init` wrote), .zip or .tar.gz,
    installing nothing."""
    try:
        result = plugin_admin.validate_path(path, settings=get_settings())
    except Cul8erError as exc:
        _refused(exc, as_json)
    _print(result, as_json)


@plugin_cli.command("init")
def plugin_init(
    name: str,
    plugin_type: Annotated[PluginType, typer.Option("--type", help="The plugin type.")] = (
        PluginType.OBSERVER
    ),
    directory: Annotated[Path, typer.Option(help="Where to write the package.")] = Path("."),
    trusted: Annotated[
        bool, typer.Option(help="Run on general workers instead of the sandbox.")
    ] = False,
) -> None:
    """Write a working plugin package: manifest, config model, a passing test, a README."""
    from workers.pluginhost.template import write_plugin

    try:
        project = write_plugin(directory, name=name, plugin_type=plugin_type, trusted=trusted)
    except Cul8erError as exc:
        _refused(exc, False)
    console.print(
        line(f"wrote {project} (pip install {project}; cul8er plugin validate {project})")
    )


@plugin_cli.command("rehash")
def plugin_rehash(package: Path) -> None:
    """Refresh a plugin folder's file hashes in its manifest after editing its code."""
    from workers.pluginhost.trust import MANIFEST_FILE, file_digests

    manifest_path = package / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = file_digests(package)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    console.print(line(f"{manifest_path}: {len(manifest['files'])} files hashed"))


@plugin_cli.command("install")
def plugin_install(
    source: str,
    sha256: Annotated[
        str | None,
        typer.Option(
            help="The archive's sha256 (of a folder: its manifest file's), checked first."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Install from a folder, .zip or .tar.gz, git+URL@REF, or NAME[==V] from the registries
    (CUL8ER_PLUGIN_REGISTRIES; with none, NAME goes to pip)."""
    _composed()
    try:
        result = plugin_admin.install(source, settings=get_settings(), sha256=sha256)
    except Cul8erError as exc:
        _refused(exc, as_json)
    _print(result, as_json)
    if result.get("ok") is False or result.get("state") == "failed":
        raise typer.Exit(1)


@plugin_cli.command("search")
def plugin_search(query: str, as_json: JsonOpt = False) -> None:
    """Plugins on the registries whose name, description or keywords hold QUERY."""
    import base64

    from workers.pluginhost.indexes import search

    settings = get_settings()
    if not settings.plugin_registries:
        raise fail("config_error", "no plugin registry is configured (CUL8ER_PLUGIN_REGISTRIES)")
    keys = [base64.b64decode(key) for key in settings.plugin_trusted_keys]
    try:
        found = search(plugin_admin.registries(settings), query, trusted_keys=keys)
    except Cul8erError as exc:
        _refused(exc, as_json)
    if as_json:
        emit(found)
        return
    table = Table("name", "version", "type", "signed", "description")
    for item in found:
        signed = "yes" if item["signed"] else "no"
        add_row(table, item["name"], item["version"], item["type"], signed, item["description"])
    console.print(table)


@plugin_cli.command("update")
def plugin_update(
    name: str,
    deploy: Annotated[
        str | None,
        typer.Option(help="Then roll the fleet onto it with this deployment strategy."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Install the newest fitting registry version beside the serving one (which keeps
    serving); with --deploy, start a deployment of it."""
    _composed()
    try:
        result = plugin_admin.update(name, settings=get_settings())
    except Cul8erError as exc:
        _refused(exc, as_json)
    if result.get("ok") and deploy and result.get("switched") is False:
        from workers.cli.client import call

        kwargs = {"plugin": name, "version": result["version"], "strategy": deploy}
        answer = call("cul8er.deployments.create", kwargs)
        result["deployment"] = answer
        if not answer.get("ok"):
            result["ok"] = False
            result["error"] = answer.get("error")
    _print(result, as_json)
    if not result.get("ok"):
        raise typer.Exit(1)


def _set(name: str, enabled: bool, as_json: bool) -> None:
    _composed()
    try:
        result = plugin_admin.set_enabled(name, enabled, settings=get_settings())
    except Cul8erError as exc:
        _refused(exc, as_json)
    _print(result, as_json)


@plugin_cli.command("enable")
def plugin_enable(name: str, as_json: JsonOpt = False) -> None:
    """Serve the plugin again; running workers follow within CUL8ER_PLUGIN_STATE_TTL."""
    _set(name, True, as_json)


@plugin_cli.command("disable")
def plugin_disable(name: str, as_json: JsonOpt = False) -> None:
    """Stop serving the plugin; its calls are refused until it is enabled."""
    _set(name, False, as_json)


@plugin_cli.command("reload")
def plugin_reload(
    name: str,
    version: Annotated[str | None, typer.Option(help="A version found on the plugin path.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Move to the newest version found; a version that fails its checks leaves the old one."""
    _composed()
    try:
        result = plugin_admin.reload(name, settings=get_settings(), version=version)
    except Cul8erError as exc:
        _refused(exc, as_json)
    _print(result, as_json)
    if not result.get("ok"):
        raise typer.Exit(1)
