"""``/api/v1/plugins`` and a tenant's plugin versions.

Installing, enabling, disabling and reloading are the public tasks ``cul8er.plugins.*``; a
tenant's version and config are ``cul8er.tenants.set_plugin``. Lists and search read the
plugin host directly (they change nothing).
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from schemas.tasks import InstallPlugin
from workers.api.deps import Caller, IdempotencyKey, Writer
from workers.api.enqueue import call
from workers.api.problems import from_task_answer
from workers.api.roles import Action, authorize
from workers.pluginhost import admin
from workers.pluginhost.indexes import search as search_indexes
from workers.pluginhost.registry import PluginRegistry
from workers.pluginhost.tenancy import choices_of
from workers.runtime.db import session_scope
from workers.runtime.errors import NotFoundError
from workers.runtime.models import Tenant
from workers.runtime.settings import get_settings

__all__ = ["router", "tenant_router"]

router = APIRouter(prefix="/plugins", tags=["plugins"])
tenant_router = APIRouter(prefix="/tenants/{tenant_id}/plugins", tags=["plugins"])


class TenantPluginChoice(BaseModel):
    """The version a tenant runs (none: the plugin's own) and its config overrides."""

    model_config = ConfigDict(extra="forbid", strict=True)
    version: Annotated[str, Field(max_length=64)] | None = None
    config: dict[str, Any] = Field(default_factory=dict)


def _answer(answer: dict[str, Any]) -> Response:
    return JSONResponse(answer) if answer.get("ok") else from_task_answer(answer)


def _registry() -> PluginRegistry:
    return PluginRegistry(get_settings()).boot()


@router.get("", summary="Every plugin: version, type, state, queue, error")
def list_plugins(caller: Caller) -> dict[str, Any]:
    """Plugins as the plugins table says they serve."""
    authorize(caller, Action.PLUGIN_READ)
    return {"items": _registry().status()}


@router.get("/search", summary="Plugins on the configured registries")
def search(caller: Caller, q: Annotated[str, Query(min_length=1, max_length=100)]) -> Any:
    """Plugins whose name, description or keywords hold ``q`` (name, version, type, signed)."""
    authorize(caller, Action.PLUGIN_READ)
    settings = get_settings()
    keys = [base64.b64decode(key) for key in settings.plugin_trusted_keys]
    indexes = admin.registries(settings)  # none configured: nothing to find
    return {
        "registries": len(indexes),
        "items": search_indexes(indexes, q, trusted_keys=keys) if indexes else [],
    }


@router.get("/{name}", summary="One plugin, and how many tenants run each version")
def info(name: str, caller: Caller) -> dict[str, Any]:
    """A plugin's row, its installed versions and the tenants on each."""
    authorize(caller, Action.PLUGIN_READ)
    registry = _registry()
    rows = {row["name"]: row for row in registry.status()}
    if name not in rows:
        raise NotFoundError(f"no plugin {name!r}")
    view = dict(rows[name])
    if name in registry.served:
        view["versions"] = registry.installed_versions(name)
    return view


@router.post("", status_code=200, summary="Install a plugin (a path on the worker, or pip)")
def install(body: InstallPlugin, caller: Writer) -> Response:
    """Install a plugin through ``cul8er.plugins.install``."""
    authorize(caller, Action.PLUGIN_INSTALL)
    kwargs = {**body.model_dump(exclude_none=True), "actor": caller.subject}
    return _answer(call("cul8er.plugins.install", kwargs, timeout=300))


def _admin_route(action: str, summary: str) -> None:
    def route(name: str, caller: Writer) -> Response:
        authorize(caller, Action.PLUGIN_ADMIN)
        kwargs = {"name": name, "actor": caller.subject}
        return _answer(call(f"cul8er.plugins.{action}", kwargs, timeout=120))

    route.__name__ = f"{action}_plugin"
    route.__doc__ = summary
    router.post(f"/{{name}}/{action}", summary=summary)(route)


for _action, _summary in (
    ("enable", "Serve the plugin again on every worker"),
    ("disable", "Stop serving the plugin on every worker"),
    ("reload", "Move the plugin to its newest version once it passed every check"),
):
    _admin_route(_action, _summary)


@tenant_router.get("", summary="Which version of each plugin the tenant runs")
def tenant_plugins(tenant_id: str, caller: Caller) -> dict[str, Any]:
    """Per plugin: the version the tenant runs, pinned or the plugin's, and its overrides."""
    authorize(caller, Action.TENANT_READ, tenant_id=tenant_id)
    registry = _registry()
    with session_scope() as session:
        if session.get(Tenant, tenant_id) is None:
            raise NotFoundError(f"tenant {tenant_id!r} does not exist")
        rows = choices_of(session, tenant_id)
        items = [
            {
                "plugin": name,
                "version": (rows[name].version if name in rows else None) or served.loaded.version,
                "pinned": bool(name in rows and rows[name].version),
                "config_overrides": sorted(rows[name].config) if name in rows else [],
            }
            for name, served in sorted(registry.served.items())
        ]
    return {"tenant_id": tenant_id, "items": items}


@tenant_router.put("/{plugin}", summary="Pin a plugin version and config for the tenant")
def set_tenant_plugin(
    tenant_id: str,
    plugin: str,
    body: TenantPluginChoice,
    caller: Writer,
    key: IdempotencyKey = None,
) -> Response:
    """The tenant's version of ``plugin`` and its config overrides (neither: back to the
    plugin's); ``${secret:…}`` values stay references."""
    authorize(caller, Action.TENANT_PLUGIN_WRITE, tenant_id=tenant_id)
    kwargs: dict[str, Any] = {
        "tenant_id": tenant_id,
        "plugin": plugin,
        "config": body.config,
        "actor": caller.subject,
    }
    if body.version is not None:
        kwargs["version"] = body.version
    return _answer(call("cul8er.tenants.set_plugin", kwargs, key=key, subject=caller.subject))
