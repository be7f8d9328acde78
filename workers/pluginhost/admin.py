"""Operator actions on plugins: validate, install, enable, disable, reload.

Each writes the ``plugins`` table (bumping ``generation``) and an audit event; running
workers pick the change up within ``CUL8ER_PLUGIN_STATE_TTL``. A reload validates the
new version completely — trust, dependencies, contract, config and its self-test —
before the table points at it, so a broken version never replaces a working one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from workers.engine.events import emit
from workers.pluginhost.contracts import operations
from workers.pluginhost.deps import load_order
from workers.pluginhost.discovery import ARCHIVE_SUFFIXES, read_candidate
from workers.pluginhost.loader import build_instance, load_candidate, validate_config
from workers.pluginhost.registry import API_VERSION, PluginRegistry
from workers.pluginhost.trust import MANIFEST_FILE
from workers.runtime.db import session_scope
from workers.runtime.errors import ConflictError, NotFoundError, PluginError
from workers.runtime.models import AuditEvent, Plugin

if TYPE_CHECKING:
    from schemas.manifest import Manifest
    from workers.pluginhost.discovery import Candidate
    from workers.pluginhost.loader import LoadedPlugin
    from workers.runtime.settings import Settings

__all__ = ["install", "reload", "set_enabled", "validate_path"]

log = structlog.get_logger(__name__)


def _emit(name: str, old: str | None, new: str, version: str, error: str | None) -> None:
    from workers.pluginhost.calls import registry

    registry()  # the observers this process knows of (the CLI has not booted it yet)

    emit(
        "plugin.state_changed",
        subject=name,
        data={"plugin": name, "from": old, "to": new, "version": version, "error": error},
    )


def _audit(
    session: Any, name: str, old: str | None, new: str, version: str, error: str | None
) -> None:
    session.add(
        AuditEvent(
            tenant_id=None,
            kind="plugin.state_changed",
            data={"plugin": name, "from": old, "to": new, "version": version, "error": error},
        )
    )


def set_enabled(name: str, enabled: bool, *, settings: Settings) -> dict[str, Any]:
    """Enable or disable ``name``; running workers follow without a restart.

    Raises:
        NotFoundError: no such plugin in the table.
        ConflictError: enabling a plugin that failed validation (reload it first).
    """
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.get(Plugin, name, with_for_update=True)
        if row is None:
            raise NotFoundError(f"plugin {name!r} is not installed (cul8er plugin list)")
        if enabled and row.state == "failed":
            raise ConflictError(f"plugin {name!r} failed: {row.error}; fix it and reload it")
        if (
            enabled
            and row.state == "disabled"
            and row.error
            and row.error.startswith("needs config")
        ):
            raise ConflictError(f"plugin {name!r} {row.error}")
        old, new = row.state, "active" if enabled else "disabled"
        changed = row.enabled != enabled or old != new
        if changed:
            row.enabled, row.state = enabled, new
            row.generation += 1
            _audit(session, name, old, new, row.version, None)
        version = row.version
    if changed:
        _emit(name, old, new, version, None)
        log.info("plugin_state_set", plugin=name, state=new)
    return {"name": name, "version": version, "state": new, "changed": changed}


def _unpack(path: Path, into: Path) -> Path:
    """The folder holding ``path``'s manifest: the folder itself, or an archive extracted."""
    from workers.pluginhost.discovery import _archive_root, _extract

    if path.is_dir():
        if (path / MANIFEST_FILE).is_file():
            return path
        # A package root (what `cul8er plugin init` writes): the manifest sits in its module.
        inside = [d for d in sorted(path.iterdir()) if (d / MANIFEST_FILE).is_file()]
        if len(inside) == 1:
            return inside[0]
        raise PluginError(
            f"{path} has no {MANIFEST_FILE}, nor one package folder holding it"
            + (f" (found {len(inside)})" if inside else ""),
            plugin_name=path.name,
        )
    if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
        root = _archive_root(_extract(path, into))
        if root is None:
            raise PluginError(f"archive {path} holds no {MANIFEST_FILE}", plugin_name=path.name)
        return root
    raise PluginError(f"{path} is not a plugin folder, .zip or .tar.gz", plugin_name=path.name)


def _check_order(manifest: Manifest, settings: Settings, *, database: bool = True) -> None:
    """``manifest`` among every other plugin present: API, dependencies, conflicts, cycles.

    Other plugins' own problems are theirs: only a refusal that involves ``manifest`` counts.
    """
    registry = PluginRegistry(settings, database=database).boot()
    others = {n: s.loaded.manifest for n, s in registry.served.items() if n != manifest.name}
    for name, versions in registry.candidates.items():
        if name != manifest.name and name not in others and name in registry.refused:
            refused = versions.get(registry.refused[name].version)
            if refused is not None:
                others[name] = refused.manifest
    present = {**others, manifest.name: manifest}
    while True:
        try:
            load_order(list(present.values()), api_version=API_VERSION)
            return
        except PluginError as exc:
            chain = f" {exc} ".replace("->", " ")
            if exc.plugin_name == manifest.name or (
                "cycle" in chain and f" {manifest.name} " in chain
            ):
                raise
            present.pop(exc.plugin_name, None)


def _check(
    candidate: Candidate, settings: Settings, config: dict[str, Any], *, database: bool = True
) -> LoadedPlugin:
    """Everything a plugin must pass to serve: trust, API and dependencies, contract, self-test."""
    _check_order(candidate.manifest, settings, database=database)
    loaded = load_candidate(candidate, settings)
    model = validate_config(loaded, config)
    registry = PluginRegistry(settings, database=database)
    build_instance(loaded, model, registry.context(loaded))
    return loaded


def validate_path(path: Path, *, settings: Settings) -> dict[str, Any]:
    """Validate the plugin at ``path`` (folder, .zip, .tar.gz) without installing it.

    Raises:
        PluginError: naming the first rule it breaks.
    """
    with tempfile.TemporaryDirectory(prefix="cul8er-validate-") as scratch:
        root = _unpack(path.resolve(), Path(scratch))
        candidate = read_candidate(f"path:{root}", root)
        config = settings.plugin_config.get(candidate.manifest.name, {})
        # It installs nothing, so it reads and writes no plugin state.
        loaded = _check(candidate, settings, config, database=False)
        return _describe(loaded)


def _describe(loaded: LoadedPlugin) -> dict[str, Any]:
    manifest = loaded.manifest
    return {
        "name": manifest.name,
        "version": manifest.version,
        "type": manifest.type.value,
        "trusted": manifest.trusted,
        "signed": loaded.signed,
        "checksum": loaded.checksum,
        "permissions": sorted(p.value for p in manifest.permissions),
        "operations": list(operations(manifest.type)),
        "valid": True,
    }


def install(source: str, *, settings: Settings) -> dict[str, Any]:
    """Install a plugin from a folder, .zip or .tar.gz (copied under the data dir) or with pip.

    A new version of an installed plugin is reloaded onto it (the old one serves until the
    new one passed every check).
    """
    path = Path(source).expanduser()
    if not path.exists():
        # Not a file: a requirement for pip (a package name, a wheel URL, ``name==1.2``).
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", source], check=True)
        PluginRegistry(settings).boot()
        return {"installed": source, "via": "pip"}
    with tempfile.TemporaryDirectory(prefix="cul8er-install-") as scratch:
        root = _unpack(path.resolve(), Path(scratch))
        candidate = read_candidate(f"path:{root}", root)
        manifest = candidate.manifest
        config = settings.plugin_config.get(manifest.name, {})
        _check(candidate, settings, config)
        target = settings.installed_plugins_dir / f"{manifest.name}-{manifest.version}"
        if not target.exists():
            settings.installed_plugins_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            shutil.copytree(
                root, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
            )
            staging.rename(target)
    with session_scope(settings.sqlalchemy_url) as session:
        known = session.get(Plugin, manifest.name) is not None
    if known:
        return reload(manifest.name, settings=settings, version=manifest.version)
    PluginRegistry(settings).boot()  # records the new plugin's row
    log.info("plugin_installed", plugin=manifest.name, version=manifest.version)
    return {
        "name": manifest.name,
        "version": manifest.version,
        "state": "active",
        "path": str(target),
    }


def _candidate(name: str, settings: Settings, version: str | None) -> Candidate:
    """The version of ``name`` found on disk that a reload asks for (newest by default).

    Raises:
        NotFoundError: naming the versions found, if any.
    """
    registry = PluginRegistry(settings)
    registry._discover()
    versions = registry.candidates.get(name, {})
    if not versions:
        raise NotFoundError(f"no plugin {name!r} found on the plugin path or in installed packages")
    candidate = (
        versions.get(version)
        if version
        else max(versions.values(), key=lambda c: c.manifest.parsed_version)
    )
    if candidate is None:
        raise NotFoundError(
            f"plugin {name!r} {version} not found; found: {', '.join(sorted(versions))}"
        )
    return candidate


def reload(name: str, *, settings: Settings, version: str | None = None) -> dict[str, Any]:
    """Point ``name`` at its newest version found (or ``version``) once that version passed.

    On failure the table keeps the version that serves and records why the new one did not.
    """
    candidate = _candidate(name, settings, version)
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.get(Plugin, name)
        serving = (row.version, row.checksum, row.config, row.state) if row else None
    config = settings.plugin_config.get(name, serving[2] if serving else {})
    try:
        loaded = _check(candidate, settings, config)
    except PluginError as exc:
        _record_failure(name, settings, str(exc), candidate.manifest.version)
        return {
            "name": name,
            "ok": False,
            "error": str(exc),
            "serving": serving[0] if serving else None,
        }
    if serving is not None and serving[1] == loaded.checksum:
        return {"name": name, "ok": True, "version": loaded.version, "changed": False}
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.get(Plugin, name, with_for_update=True)
        if row is None:
            PluginRegistry(settings).boot()
            return {"name": name, "ok": True, "version": loaded.version, "changed": True}
        old_version = row.version
        row.version = loaded.version
        row.checksum = loaded.checksum
        row.root = str(loaded.root)
        row.source = loaded.source
        row.error = None
        if row.state == "failed":
            row.state = "active" if row.enabled else "disabled"
        row.generation += 1
        _audit(session, name, old_version, row.state, loaded.version, None)
        state = row.state
    _emit(name, old_version, state, loaded.version, None)
    log.info("plugin_reloaded", plugin=name, old=old_version, new=loaded.version)
    return {
        "name": name,
        "ok": True,
        "version": loaded.version,
        "previous": old_version,
        "changed": True,
        "state": state,
    }


def _record_failure(name: str, settings: Settings, error: str, version: str) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.get(Plugin, name, with_for_update=True)
        if row is None:
            return
        row.error = f"reload to {version} failed: {error}"
        row.generation += 1
        _audit(session, name, row.state, row.state, version, row.error)
    log.warning("plugin_reload_refused", plugin=name, version=version, error=error)
