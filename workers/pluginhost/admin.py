"""Operator actions on plugins: validate, install, enable, disable, reload.

Each writes the ``plugins`` table (bumping ``generation``) and an audit event; running
workers pick the change up within ``CUL8ER_PLUGIN_STATE_TTL``. A reload validates the
new version completely — trust, dependencies, contract, config and its self-test —
before the table points at it, so a broken version never replaces a working one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from workers.engine.events import emit
from workers.pluginhost.contracts import operations
from workers.pluginhost.deps import load_order
from workers.pluginhost.discovery import ARCHIVE_SUFFIXES, read_candidate
from workers.pluginhost.indexes import PackageIndex, fetch_wheel_plugin, newest
from workers.pluginhost.loader import build_instance, load_candidate, validate_config
from workers.pluginhost.registry import API_VERSION, PluginRegistry
from workers.pluginhost.sources import (
    FolderSource,
    GitSource,
    PipSource,
    RegistrySource,
    file_sha256,
    git_checkout,
    parse_source,
    redact_url,
)
from workers.pluginhost.trust import MANIFEST_FILE
from workers.runtime.db import session_scope
from workers.runtime.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    PluginError,
    ValidationFailedError,
)
from workers.runtime.models import AuditEvent, Plugin

if TYPE_CHECKING:
    from schemas.manifest import Manifest
    from workers.pluginhost.discovery import Candidate
    from workers.pluginhost.indexes import IndexFile
    from workers.pluginhost.loader import LoadedPlugin
    from workers.runtime.settings import Settings

__all__ = ["install", "registries", "reload", "set_enabled", "update", "validate_path"]

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
    session: Any,
    name: str,
    old: str | None,
    new: str,
    version: str,
    error: str | None,
    actor: str | None = None,
) -> None:
    data = {"plugin": name, "from": old, "to": new, "version": version, "error": error}
    session.add(
        AuditEvent(
            tenant_id=None,
            kind="plugin.state_changed",
            data={**data, "actor": actor} if actor else data,
        )
    )


def set_enabled(
    name: str, enabled: bool, *, settings: Settings, actor: str | None = None
) -> dict[str, Any]:
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
            _audit(session, name, old, new, row.version, None, actor)
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


def registries(settings: Settings) -> list[PackageIndex]:
    """The configured package indexes, in order; their ``${secret:…}`` resolve per request."""
    return [PackageIndex(url, resolve=_resolve_secrets) for url in settings.plugin_registries]


def _resolve_secrets(raw: str) -> str:
    """``raw`` with its ``${secret:…}`` references resolved through the secrets plugins."""
    from workers.pluginhost.secrets import find_refs

    if not find_refs(raw):
        return raw
    from workers.pluginhost.calls import _resolver, registry

    resolved: str = _resolver(registry())(raw)
    return resolved


def _refuse_digest(what: str, name: str, expected: str, actual: str) -> None:
    """Raise unless ``actual`` is the ``expected`` sha256 (both are named)."""
    if actual != expected.strip().lower():
        raise PluginError(
            f"{what}: sha256 {actual} does not match the expected {expected.strip().lower()}",
            plugin_name=name,
        )


def _fetch_local(source: FolderSource, scratch: Path, sha256: str | None) -> Path:
    """The plugin folder of a local folder or archive; ``sha256`` checked before extraction."""
    path = source.path.resolve()
    if source.archive and sha256 is not None:
        _refuse_digest(f"archive {path}", path.name, sha256, file_sha256(path))
    root = _unpack(path, scratch)
    if not source.archive and sha256 is not None:
        # A folder has no one file to hash but its manifest, which carries every file's hash.
        manifest = root / MANIFEST_FILE
        _refuse_digest(f"manifest {manifest}", path.name, sha256, file_sha256(manifest))
    return root


def _fetch(
    source: FolderSource | GitSource | RegistrySource,
    scratch: Path,
    settings: Settings,
    sha256: str | None,
) -> tuple[Path, dict[str, str]]:
    """(the plugin folder under ``scratch``, where it came from) for a non-pip source."""
    if isinstance(source, FolderSource):
        return _fetch_local(source, scratch, sha256), {}
    if isinstance(source, GitSource):
        checkout, commit = git_checkout(source, scratch / "checkout")
        root = _unpack(checkout, scratch / "unpacked")
        if sha256 is not None:
            digest = file_sha256(root / MANIFEST_FILE)
            _refuse_digest(f"manifest at {commit}", root.name, sha256, digest)
        return root, {"source": f"git:{redact_url(source.url)}@{commit}", "commit": commit}
    index, file = _find_wheel(source.name, source.specifier, settings)
    if sha256 is not None:
        _refuse_digest(f"{file.filename} (index)", source.name, sha256, file.sha256 or "")
    plugin = fetch_wheel_plugin(index, file, scratch)
    origin = {"source": f"registry:{file.url}", "registry": index.shown}
    return plugin.root, {**origin, "sha256": file.sha256 or ""}


def _project_names(name: str) -> list[str]:
    """Index projects that may hold plugin ``name``: itself, and ``cul8er-NAME`` as
    ``cul8er plugin init`` names its packages."""
    plain = canonicalize_name(name)
    prefixed = canonicalize_name(f"cul8er-{plain}")
    return [plain] if plain.startswith("cul8er-") else [plain, prefixed]


def _find_wheel(
    name: str, specifier: SpecifierSet, settings: Settings
) -> tuple[PackageIndex, IndexFile]:
    """The newest wheel of ``name`` that ``specifier`` admits, on the first index holding one.

    Raises:
        NotFoundError: no index has such a wheel (naming the indexes asked).
    """
    indexes = registries(settings)
    for index in indexes:
        for project in _project_names(name):
            found = newest(index.files(project), specifier)
            if found:
                return index, found[0][1]
    asked = ", ".join(index.shown for index in indexes)
    raise NotFoundError(f"no wheel of {name}{specifier} on the plugin registries ({asked})")


def _pip(source: str, settings: Settings, sha256: str | None) -> dict[str, Any]:
    """The old path, kept for when no registry is configured: ``pip install SOURCE``."""
    if sha256 is not None:
        raise ValidationFailedError(
            f"--sha256 needs a folder, an archive, git+URL or a registry; not pip ({source!r})",
            errors=[{"field": "sha256", "message": "not checkable through pip"}],
        )
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", source],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PluginError(f"pip could not install {source!r}: {why[0][:300]}", plugin_name=source)
    PluginRegistry(settings).boot()
    return {"installed": source, "via": "pip"}


def install(
    source: str,
    *,
    settings: Settings,
    sha256: str | None = None,
    switch: bool = True,
    actor: str | None = None,
) -> dict[str, Any]:
    """Install a plugin from a folder, a .zip or .tar.gz, ``git+URL@REF``, the package
    indexes of ``plugin_registries`` (``NAME``, ``NAME==V``), or with pip when none is set.

    ``sha256`` is checked before anything is extracted or imported: an archive's own, a
    folder's manifest file, a registry wheel's. A new version of an installed plugin is
    reloaded onto it (the old one serves until the new one passed every check); with
    ``switch=False`` it is only checked and copied beside the old one, and nothing changes
    which version serves.

    Raises:
        PluginError: a check failed (hashes, signature, contract, self-test), naming it.
        NotFoundError: no registry holds the plugin in a version asked for.
    """
    parsed = parse_source(source)
    if isinstance(parsed, PipSource | RegistrySource) and not settings.plugin_registries:
        return _pip(source, settings, sha256)
    if isinstance(parsed, PipSource):
        raise ValidationFailedError(
            f"{source!r} is no folder, archive, git+URL@REF or NAME[==VERSION]",
            errors=[{"field": "source", "message": "not a plugin source"}],
        )
    with tempfile.TemporaryDirectory(prefix="cul8er-install-") as scratch:
        root, origin = _fetch(parsed, Path(scratch), settings, sha256)
        manifest, target = _place(root, settings)
    if not switch:
        log.info("plugin_staged", plugin=manifest.name, version=manifest.version)
        return {
            "name": manifest.name,
            "version": manifest.version,
            "path": str(target),
            "switched": False,
            **origin,
        }
    result = _activate(manifest, target, settings, actor=actor)
    if origin.get("source") and result.get("ok", True):
        _record_source(manifest.name, manifest.version, origin["source"], settings)
    return {**result, **origin}


def _place(root: Path, settings: Settings) -> tuple[Manifest, Path]:
    """Check the plugin in ``root`` completely, then copy it under the installed plugins dir.

    A plugin whose manifest sits in its own module folder (what ``cul8er plugin init``
    writes, and what a wheel holds) is kept as ``NAME-VERSION.zip`` holding that folder
    under the module's name, since the loader imports such a folder only under that name;
    any other plugin folder is copied as the folder ``NAME-VERSION``.
    """
    candidate = read_candidate(f"path:{root}", root)
    manifest = candidate.manifest
    config = settings.plugin_config.get(manifest.name, {})
    _check(candidate, settings, config)
    stem = f"{manifest.name}-{manifest.version}"
    package = root.name == manifest.module.partition(".")[0] and (root / "__init__.py").is_file()
    target = settings.installed_plugins_dir / (f"{stem}.zip" if package else stem)
    if target.exists():
        return manifest, target
    settings.installed_plugins_dir.mkdir(parents=True, exist_ok=True)
    if package:
        handle, name = tempfile.mkstemp(prefix=f".{stem}-", dir=target.parent)
        os.close(handle)
        _zip_folder(root, Path(name))
        Path(name).rename(target)
    else:
        staging = Path(tempfile.mkdtemp(prefix=f".{stem}-", dir=target.parent))
        shutil.copytree(
            root, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )
        staging.rename(target)
    return manifest, target


def _zip_folder(root: Path, archive: Path) -> None:
    """Write ``root``'s files (no bytecode) into ``archive`` under ``root.name/``."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if "__pycache__" in relative.parts or path.suffix == ".pyc" or not path.is_file():
                continue
            out.write(path, f"{root.name}/{relative.as_posix()}")


def _activate(
    manifest: Manifest, target: Path, settings: Settings, *, actor: str | None = None
) -> dict[str, Any]:
    """Serve the version just placed: reload onto it, or record a plugin new to the table."""
    with session_scope(settings.sqlalchemy_url) as session:
        known = session.get(Plugin, manifest.name) is not None
    if known:
        return reload(manifest.name, settings=settings, version=manifest.version, actor=actor)
    registry = PluginRegistry(settings).boot()  # records the new plugin's row
    served, refused = registry.served.get(manifest.name), registry.refused.get(manifest.name)
    with session_scope(settings.sqlalchemy_url) as session:
        session.add(
            AuditEvent(
                tenant_id=None,
                kind="plugin.installed",
                data={"plugin": manifest.name, "version": manifest.version, "actor": actor},
            )
        )
    log.info("plugin_installed", plugin=manifest.name, version=manifest.version)
    return {
        "name": manifest.name,
        "version": manifest.version,
        "state": served.state if served else _refused_state(refused),
        "error": refused.error if refused and not served else None,
        "path": str(target),
    }


def _refused_state(refusal: Any) -> str:
    return "disabled" if refusal is not None and refusal.needs_config else "failed"


def _record_source(name: str, version: str, source: str, settings: Settings) -> None:
    """Say where the serving version came from (a git commit, a registry wheel)."""
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.get(Plugin, name, with_for_update=True)
        if row is not None and row.version == version:
            row.source = source


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


def reload(
    name: str, *, settings: Settings, version: str | None = None, actor: str | None = None
) -> dict[str, Any]:
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
        _audit(session, name, old_version, row.state, loaded.version, None, actor)
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


def _required_ranges(name: str, settings: Settings) -> dict[str, SpecifierSet]:
    """Every other installed plugin that requires ``name``: its name → the range it needs."""
    registry = PluginRegistry(settings).boot()
    manifests = [served.loaded.manifest for served in registry.served.values()]
    for other, refusal in registry.refused.items():
        candidate = registry.candidates.get(other, {}).get(refusal.version)
        if candidate is not None:
            manifests.append(candidate.manifest)
    return {
        manifest.name: SpecifierSet(requirement.versions)
        for manifest in manifests
        if manifest.name != name
        for requirement in manifest.requires
        if requirement.name == name
    }


def _newer(name: str, current: str, settings: Settings) -> tuple[PackageIndex, list[IndexFile]]:
    """The first index holding ``name``, and its wheels newer than ``current``, newest first."""
    indexes = registries(settings)
    for index in indexes:
        for project in _project_names(name):
            files = index.files(project)
            if files:
                found = newest(files, SpecifierSet(), above=Version(current))
                return index, [file for _, file in found]
    asked = ", ".join(index.shown for index in indexes)
    raise NotFoundError(f"no plugin registry holds {name!r} ({asked})")


def _blocked(name: str, version: str, needs: dict[str, SpecifierSet]) -> list[str]:
    return [
        f"{other} requires {name}{spec}"
        for other, spec in sorted(needs.items())
        if not spec.contains(version, prereleases=True)
    ]


def update(name: str, *, settings: Settings) -> dict[str, Any]:
    """Install the newest registry version of ``name`` that fits, beside the one serving.

    It must be newer than the installed version, admit this host's plugin API, satisfy
    every other installed plugin's requirement on ``name``, and pass every check (index
    sha256, file hashes, signature, contract, self-test). Nothing changes which version
    serves: a deployment moves the fleet. The answer's ``ok`` is false, with the reason,
    when no version qualifies or the chosen one fails a check.

    Raises:
        NotFoundError: ``name`` is not installed, or no registry holds it.
        ConfigError: no registry is configured.
    """
    if not settings.plugin_registries:
        raise ConfigError("no plugin registry is configured (CUL8ER_PLUGIN_REGISTRIES)")
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.get(Plugin, name)
        if row is None:
            raise NotFoundError(f"plugin {name!r} is not installed (cul8er plugin list)")
        current = row.version
    needs = _required_ranges(name, settings)
    index, files = _newer(name, current, settings)
    answer: dict[str, Any] = {"name": name, "serving": current, "registry": index.shown}
    skipped: list[str] = []
    for file in files:
        version = str(file.wheel[1]) if file.wheel else ""
        if blocked := _blocked(name, version, needs):
            skipped.append(f"{version}: {'; '.join(blocked)}")
            continue
        try:
            with tempfile.TemporaryDirectory(prefix="cul8er-update-") as scratch:
                plugin = fetch_wheel_plugin(index, file, Path(scratch))
                if why := _unfit(plugin.manifest, name, version):
                    skipped.append(f"{version}: {why}")
                    continue
                manifest, target = _place(plugin.root, settings)
        except PluginError as exc:
            log.warning("plugin_update_refused", plugin=name, version=version, error=str(exc))
            return {**answer, "ok": False, "version": version, "error": str(exc)}
        log.info("plugin_update_staged", plugin=name, version=manifest.version, serving=current)
        return {
            **answer,
            "ok": True,
            "version": manifest.version,
            "path": str(target),
            "source": f"registry:{file.url}",
            "switched": False,
        }
    if not files:
        return {**answer, "ok": True, "version": current, "changed": False}
    error = f"no compatible version of {name!r} newer than {current}: {'; '.join(skipped)}"
    return {**answer, "ok": False, "error": error}


def _unfit(manifest: Manifest, name: str, version: str) -> str | None:
    """Why a registry wheel's manifest cannot update ``name`` to ``version`` here, if it can't."""
    if manifest.name != name:
        return f"the wheel holds plugin {manifest.name!r}"
    if manifest.parsed_version != Version(version):
        return f"its manifest says version {manifest.version}"
    if not manifest.supports_api(API_VERSION):
        return f"needs plugin API {manifest.api}, this host offers {API_VERSION}"
    return None
