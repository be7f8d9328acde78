"""The public plugin tasks (``cul8er.plugins.install | enable | disable | reload``) and the
sandbox stage's check (``cul8er.plugins.sandbox_check``, sent to the sandbox queue).

They act on the shared ``plugins`` table, so whichever worker runs them, every worker
follows. Each is idempotent by nature: enabling an enabled plugin changes nothing,
installing the same version again finds it installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from schemas.states import DEPLOYMENT_OPEN
from schemas.tasks import InstallPlugin, PluginByName, ReloadPlugin, SetTenantPlugin
from workers.engine.public import Outcome, public_task
from workers.pluginhost import admin as plugin_admin
from workers.pluginhost.calls import registry
from workers.pluginhost.loader import validate_config
from workers.pluginhost.sandbox import check_version
from workers.pluginhost.tenancy import set_choice
from workers.runtime.app import app
from workers.runtime.errors import (
    ConflictError,
    NotFoundError,
    PluginError,
    PluginRefusedError,
    ValidationFailedError,
)
from workers.runtime.models import AuditEvent, Deployment, Tenant
from workers.runtime.settings import get_settings
from workers.runtime.task import Cul8erTask

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__: list[str] = []


def _refusing(action: Callable[[], dict[str, Any]]) -> Outcome:
    """Run ``action``; a plugin that breaks a rule is answered, never retried."""
    try:
        return Outcome(action())
    except PluginError as exc:
        raise PluginRefusedError(str(exc)) from exc


# idempotent=False: no idempotency-key row; plugin_admin writes the plugins table in
# sessions of its own (SQLite admits one writer at a time).


@public_task("cul8er.plugins.enable", PluginByName, idempotent=False)
def enable(_session: Session, payload: PluginByName) -> Outcome:
    """Serve the plugin again on every worker."""
    return _refusing(
        lambda: plugin_admin.set_enabled(
            payload.name, True, settings=get_settings(), actor=payload.actor
        )
    )


@public_task("cul8er.plugins.disable", PluginByName, idempotent=False)
def disable(_session: Session, payload: PluginByName) -> Outcome:
    """Stop serving the plugin on every worker."""
    return _refusing(
        lambda: plugin_admin.set_enabled(
            payload.name, False, settings=get_settings(), actor=payload.actor
        )
    )


@public_task("cul8er.plugins.reload", ReloadPlugin, idempotent=False)
def reload(_session: Session, payload: ReloadPlugin) -> Outcome:
    """Move the plugin to its newest (or the given) version once that passed every check."""
    return _refusing(
        lambda: plugin_admin.reload(
            payload.name, settings=get_settings(), version=payload.version, actor=payload.actor
        )
    )


@public_task("cul8er.plugins.install", InstallPlugin, idempotent=False)
def install(_session: Session, payload: InstallPlugin) -> Outcome:
    """Install a plugin from a path on the worker's machine, or with pip."""
    return _refusing(
        lambda: plugin_admin.install(payload.source, settings=get_settings(), actor=payload.actor)
    )


@app.task(name="cul8er.plugins.sandbox_check", base=Cul8erTask, acks_late=False)
def sandbox_check(
    name: str, version: str, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Check ``name`` ``version`` as an install would, plus its own tests and the tenants'
    config ``overrides`` (references only). Read-only: safe to run twice; not acked late, so a
    sandbox process killed by its limits fails the check."""
    return check_version(name, version, settings=get_settings(), overrides=overrides)


def _field_error(field: str, message: str) -> ValidationFailedError:
    return ValidationFailedError(message, errors=[{"field": field, "message": message}])


def _check_choice(payload: SetTenantPlugin) -> SetTenantPlugin:
    """Before the transaction: the plugin serves, the version is installed, and the config
    (the plugin's, with the tenant's overrides over it) passes that version's config model."""
    reg = registry()
    served = reg.served.get(payload.plugin)
    if served is None or served.state != "active":
        raise _field_error("plugin", f"plugin {payload.plugin!r} is not active")
    chosen = served
    if payload.version is not None:
        installed = reg.installed_versions(payload.plugin)
        if payload.version not in installed:
            raise _field_error(
                "version",
                f"{payload.plugin} {payload.version} is not installed; "
                f"installed: {', '.join(installed)}",
            )
        try:
            chosen = reg.version(payload.plugin, payload.version)
        except PluginError as exc:
            raise _field_error("version", str(exc)) from None
    try:
        # References stay references: the check sees ``${secret:…}`` as the string it is.
        validate_config(chosen.loaded, {**served.config, **payload.config})
    except PluginError as exc:
        raise _field_error("config", str(exc)) from None
    return payload


@public_task("cul8er.tenants.set_plugin", SetTenantPlugin, prepare=_check_choice)
def set_plugin(session: Session, payload: SetTenantPlugin) -> Outcome:
    """Pin a tenant to a plugin version and give it its own config overrides."""
    tenant = session.get(Tenant, payload.tenant_id)
    if tenant is None:
        raise NotFoundError(f"tenant {payload.tenant_id!r} does not exist")
    rolling = session.scalars(
        select(Deployment.id).where(
            Deployment.plugin == payload.plugin, Deployment.status.in_(DEPLOYMENT_OPEN)
        )
    ).first()
    if rolling is not None:
        raise ConflictError(
            f"plugin {payload.plugin!r} has deployment {rolling} in progress, which moves "
            "tenants' versions: set this after it ends"
        )
    answer = set_choice(session, payload.tenant_id, payload.plugin, payload.version, payload.config)
    session.add(
        AuditEvent(
            tenant_id=tenant.id,
            kind="tenant.plugin_set",
            data={
                "plugin": payload.plugin,
                "version": payload.version,
                "config_keys": sorted(payload.config),
                "actor": payload.actor,
            },
        )
    )
    return Outcome(data=answer, tenant_id=tenant.id)
