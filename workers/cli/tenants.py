"""``cul8er tenant …``: sign tenants up, change, suspend, resume and delete them, and read them.

A change enqueues the public task by name, exactly as another service would, and with
``--wait`` follows the workflow it started to its end.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from schemas.states import Environment, TenantStatus
from workers.cli.client import call
from workers.cli.console import JsonOpt, add_row, console, emit, fail, line
from workers.cli.reads import reader
from workers.cli.runs import follow, print_run, succeeded

__all__ = ["TimeoutOpt", "WaitOpt", "tenant_cli"]

tenant_cli = typer.Typer(help="Create and change tenants.", no_args_is_help=True)

WaitOpt = Annotated[bool, typer.Option("--wait", help="Follow the workflow until it ends.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for a worker's answer.")]


def _fail_on_error(result: dict[str, Any], as_json: bool) -> None:
    """Exit with code 1 when the task refused: its answer as JSON, or ``code: message``."""
    if result.get("ok"):
        return
    if as_json:
        emit(result)
        raise typer.Exit(1)
    error = result.get("error", {})
    raise fail(str(error.get("code")), str(error.get("message")))


def _mutate(
    task: str, kwargs: dict[str, Any], *, wait: bool, as_json: bool, timeout: float
) -> None:
    """Send a change; without ``wait`` print the workflow it started, with it follow that."""
    # The worker's answer (the workflow started) comes at once; ``--timeout`` is for the run.
    result = call(task, kwargs)
    _fail_on_error(result, as_json)
    if not wait:
        if as_json:
            emit(result)
        else:
            console.print(
                line(
                    "workflow ",
                    (result["workflow_id"], "bold"),
                    f" started for {result['tenant_id']}",
                )
            )
        return
    view = follow(result["workflow_id"], as_json=as_json, timeout=timeout)
    if as_json:
        emit(view)
    else:
        print_run(view)
    if not succeeded(view):
        raise typer.Exit(1)


@tenant_cli.command("create")
def tenant_create(
    name: str,
    plan: Annotated[str, typer.Option(help="Plan name from the catalog.")] = "starter",
    tenant_id: Annotated[
        str | None, typer.Option(help="Tenant id (default: from the name).")
    ] = None,
    platform: Annotated[str | None, typer.Option(help="Platform (default from settings).")] = None,
    environment: Annotated[
        Environment, typer.Option(help="development, qa or production (needs approvals).")
    ] = Environment.DEVELOPMENT,
    idempotency_key: str | None = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 300.0,
) -> None:
    """Sign a tenant up on a plan."""
    kwargs: dict[str, Any] = {"name": name, "plan": plan, "environment": environment.value}
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


@tenant_cli.command("set-env")
def tenant_set_env(tenant_id: str, environment: Environment, as_json: JsonOpt = False) -> None:
    """Move a tenant to development, qa or production (production deployments need approvals)."""
    result = call(
        "cul8er.tenants.set_environment",
        {"tenant_id": tenant_id, "environment": environment.value},
    )
    _fail_on_error(result, as_json)
    if as_json:
        emit(result)
        return
    console.print(line((tenant_id, "bold"), f": {result['previous']} → {result['environment']}"))


@tenant_cli.command("delete")
def tenant_delete(
    tenant_id: str, wait: WaitOpt = False, as_json: JsonOpt = False, timeout: TimeoutOpt = 300.0
) -> None:
    """Deprovision a tenant: instances, data store and subnet go."""
    kwargs = {"tenant_id": tenant_id}
    _mutate("cul8er.tenants.deprovision", kwargs, wait=wait, as_json=as_json, timeout=timeout)


@tenant_cli.command("list")
def tenant_list(
    status: Annotated[
        TenantStatus | None, typer.Option(help="Only tenants in this status.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every tenant, newest first."""
    from workers.cli.views import list_tenants

    with reader() as read:
        rows = list_tenants(read, status.value if status else None)
    if as_json:
        emit(rows)
        return
    table = Table("tenant", "name", "plan", "status", "platform", "subnet", "created")
    for r in rows:
        add_row(
            table,
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
    from workers.cli.views import describe_tenant

    with reader() as read:
        view = describe_tenant(read, tenant_id)
    if as_json:
        emit(view)
        return
    release = (view["release"] or {}).get("version", "-")
    console.print(
        line(
            (view["tenant_id"], "bold"),
            f" ({view['name']}): {view['status']} on {view['plan']}, {view['platform']}, "
            f"{view['environment']}, release {release}, subnet {view['subnet'] or '-'}",
        )
    )
    console.print(
        line("entry point: ", (view["entry"] or "none (instances' own addresses)", "bold"))
    )
    if view["status_reason"]:
        console.print(line(f"reason: {view['status_reason']}"))
    table = Table("instance", "role", "release", "status", "endpoint", "limits applied")
    for i in view["instances"]:
        add_row(
            table,
            i["name"],
            i["role"],
            i["release"] or "-",
            i["status"],
            i["endpoint"] or "-",
            json.dumps(i["limits"].get("applied", {})),
        )
    console.print(table)


@tenant_cli.command("plugins")
def tenant_plugins(tenant_id: str, as_json: JsonOpt = False) -> None:
    """Which version of each plugin the tenant runs, and its own config overrides."""
    from workers.cli.lookups import find_tenant
    from workers.pluginhost.registry import PluginRegistry
    from workers.pluginhost.tenancy import choices_of
    from workers.runtime.db import session_scope
    from workers.runtime.settings import get_settings

    registry = PluginRegistry(get_settings()).boot()
    with session_scope() as session:
        tenant = find_tenant(session, tenant_id)
        rows = choices_of(session, tenant.id)
        views: list[dict[str, Any]] = []
        for name in sorted(registry.served):
            served, row = registry.served[name], rows.get(name)
            views.append(
                {
                    "plugin": name,
                    "type": served.loaded.manifest.type.value,
                    "version": (row.version if row and row.version else served.loaded.version),
                    "pinned": bool(row and row.version),
                    "fleet_version": served.loaded.version,
                    "config_overrides": sorted(row.config) if row else [],
                    "deployment_id": row.deployment_id if row else None,
                }
            )
    if as_json:
        emit(views)
        return
    table = Table("plugin", "type", "version", "how", "config overrides", "deployment")
    for v in views:
        how = "pinned" if v["pinned"] else "the plugin's"
        overrides = ", ".join(v["config_overrides"])
        add_row(
            table, v["plugin"], v["type"], v["version"], how, overrides, v["deployment_id"] or ""
        )
    console.print(table)


@tenant_cli.command("set-plugin")
def tenant_set_plugin(
    tenant_id: str,
    plugin: str,
    version: Annotated[
        str | None, typer.Option(help="Pin this version (none: the plugin's own).")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help="Config overrides as JSON; ${secret:path} values stay references."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pin the tenant to a plugin version and give it its own config (neither: reset)."""
    try:
        overrides = json.loads(config) if config else {}
    except json.JSONDecodeError as exc:
        raise fail("validation_error", f"--config is not JSON: {exc}") from None
    kwargs: dict[str, Any] = {"tenant_id": tenant_id, "plugin": plugin, "config": overrides}
    if version:
        kwargs["version"] = version
    result = call("cul8er.tenants.set_plugin", kwargs)
    _fail_on_error(result, as_json)
    if as_json:
        emit(result)
        return
    pinned = result["version"] or "the plugin's version"
    console.print(line((tenant_id, "bold"), f": {plugin} → {pinned}"))
