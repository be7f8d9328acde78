"""The public plugin tasks (``cul8er.plugins.install | enable | disable | reload``) and the
sandbox stage's check (``cul8er.plugins.sandbox_check``, sent to the sandbox queue).

They act on the shared ``plugins`` table, so whichever worker runs them, every worker
follows. Each is idempotent by nature: enabling an enabled plugin changes nothing,
installing the same version again finds it installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from schemas.tasks import InstallPlugin, PluginByName, ReloadPlugin
from workers.engine.public import Outcome, public_task
from workers.pluginhost import admin as plugin_admin
from workers.pluginhost.sandbox import check_version
from workers.runtime.app import app
from workers.runtime.errors import PluginError, PluginRefusedError
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
    return _refusing(lambda: plugin_admin.set_enabled(payload.name, True, settings=get_settings()))


@public_task("cul8er.plugins.disable", PluginByName, idempotent=False)
def disable(_session: Session, payload: PluginByName) -> Outcome:
    """Stop serving the plugin on every worker."""
    return _refusing(lambda: plugin_admin.set_enabled(payload.name, False, settings=get_settings()))


@public_task("cul8er.plugins.reload", ReloadPlugin, idempotent=False)
def reload(_session: Session, payload: ReloadPlugin) -> Outcome:
    """Move the plugin to its newest (or the given) version once that passed every check."""
    return _refusing(
        lambda: plugin_admin.reload(payload.name, settings=get_settings(), version=payload.version)
    )


@public_task("cul8er.plugins.install", InstallPlugin, idempotent=False)
def install(_session: Session, payload: InstallPlugin) -> Outcome:
    """Install a plugin from a path on the worker's machine, or with pip."""
    return _refusing(lambda: plugin_admin.install(payload.source, settings=get_settings()))


@app.task(name="cul8er.plugins.sandbox_check", base=Cul8erTask, acks_late=False)
def sandbox_check(name: str, version: str) -> dict[str, Any]:
    """Check ``name`` ``version`` as an install would, plus its own tests (read-only: safe to
    run twice; not acked late, so a sandbox process killed by its limits fails the check)."""
    return check_version(name, version, settings=get_settings())
