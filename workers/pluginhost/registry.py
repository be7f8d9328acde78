"""The plugin registry of one process: what it serves, in which version, in which state.

The ``plugins`` table is the truth (docs/architecture.md §2): ``boot`` discovers built-ins,
installed packages (``cul8er.plugins`` entry points) and plugin folders, checks trust, order and
contracts, imports what passed and records each plugin's state. Every call then reads the
table again once its view is older than ``CUL8ER_PLUGIN_STATE_TTL``, so ``enable``,
``disable`` and ``reload`` reach running workers without a restart; a new version is
imported beside the old one, and the old one keeps serving if the new one fails.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from plugins.builtin import BUILTIN_MANIFESTS
from workers.pluginhost.context import PluginContext
from workers.pluginhost.deps import load_order
from workers.pluginhost.discovery import discover_all
from workers.pluginhost.loader import build_instance, load_builtin, load_candidate, validate_config
from workers.pluginhost.tenancy import pinned_plugins, rolling_versions, tenant_choice
from workers.runtime.db import session_scope
from workers.runtime.errors import PluginError, TransientError
from workers.runtime.models import AuditEvent, Plugin

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.orm import Session

    from schemas.manifest import Manifest
    from workers.pluginhost.discovery import Candidate
    from workers.pluginhost.loader import LoadedPlugin
    from workers.runtime.settings import Settings

__all__ = [
    "API_VERSION",
    "PluginRegistry",
    "PluginUnavailableError",
    "Served",
]

log = structlog.get_logger(__name__)

#: The plugin API this cul8er offers; manifests declare the range they support.
API_VERSION: Final = "1.0"
#: Built objects kept per plugin version (one per distinct resolved config).
_BUILDS_KEPT: Final = 64
#: States a plugin row moves through (docs/architecture.md §5).
STATES: Final = ("discovered", "validated", "loaded", "active", "disabled", "failed")


def _semver_key(version: str) -> Any:
    from packaging.version import InvalidVersion, Version

    try:
        return (0, Version(version))
    except InvalidVersion:
        return (1, version)


class PluginUnavailableError(PluginError):
    """The plugin exists but does not serve now (disabled, failed, not installed)."""

    code = "plugin_unavailable"


@dataclass
class Served:
    """One plugin as this process serves it."""

    loaded: LoadedPlugin
    state: str
    enabled: bool
    queue: str
    config: dict[str, Any]
    generation: int = 0
    error: str | None = None
    #: Built objects by digest of their resolved config (tenants may carry their own).
    builds: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The plugin's name."""
        return self.loaded.name

    @property
    def trusted(self) -> bool:
        """Whether it runs on general workers (else only on the sandbox queue)."""
        return self.loaded.manifest.trusted


@dataclass
class _Row:
    """A snapshot of a ``plugins`` row, detached from its session."""

    name: str
    version: str
    state: str
    enabled: bool
    checksum: str | None
    root: str | None
    config: dict[str, Any]
    generation: int
    error: str | None
    source: str = ""


@dataclass
class _Refusal:
    name: str
    version: str
    type: str
    source: str
    error: str
    trusted: bool = False
    root: str | None = None
    checksum: str | None = None
    needs_config: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class PluginRegistry:
    """Discovery, validation, state and calls of every plugin, for one process."""

    def __init__(self, settings: Settings, *, database: bool = True) -> None:
        """``database=False``: keep no state in the ``plugins`` table, read none (a check
        that installs nothing, such as ``cul8er plugin validate``, needs no database)."""
        self.settings = settings
        self.served: dict[str, Served] = {}
        self.refused: dict[str, _Refusal] = {}
        self.notes: list[str] = []
        #: Every candidate found on disk, by name then version.
        self.candidates: dict[str, dict[str, Candidate]] = {}
        self._booted = False
        self._checked_at = 0.0
        self._db = database
        self._lock = threading.RLock()
        self._listeners: list[Callable[[Served], None]] = []
        #: Versions loaded beside the one each plugin serves, for tenants pinned to them.
        self.versions: dict[tuple[str, str], Served] = {}
        #: Plugins some tenant has a ``tenant_plugins`` row for (refreshed with the table).
        self.pinned: frozenset[str] = frozenset()
        self._unloadable: set[tuple[str, str]] = set()

    # -- boot ---------------------------------------------------------------------------------

    def on_serve(self, listener: Callable[[Served], None]) -> None:
        """Call ``listener`` for every plugin served from now on (and those served already)."""
        with self._lock:
            self._listeners.append(listener)
            for served in self.served.values():
                listener(served)

    def boot(self) -> PluginRegistry:
        """Discover, check and import every plugin, and record their states (once)."""
        with self._lock:
            if self._booted:
                return self
            self._booted = True
            rows = self._read_rows()
            self._discover()
            chosen = self._choose(rows)
            for manifest, candidate in self._ordered(chosen):
                self._load(manifest, candidate, rows.get(manifest.name))
            self._sync_rows(rows)
            self._read_pinned()
            self._checked_at = time.monotonic()
        return self

    def _read_pinned(self) -> None:
        if not self._db:
            return
        self.pinned = pinned_plugins(self.settings.sqlalchemy_url)
        # Versions being rolled out load here ahead of the tenants that will run them, so
        # the first call after a switch does not pay for the import and the self-test.
        for name, version in rolling_versions(self.settings.sqlalchemy_url):
            served = self.served.get(name)
            key = (name, version)
            if served is None or served.loaded.version == version or key in self.versions:
                continue
            if key in self._unloadable:
                continue
            try:
                self._beside(served, version)
            except PluginUnavailableError as exc:
                self._unloadable.add(key)  # the sandbox stage says why, once
                log.warning(
                    "plugin_version_not_loaded", plugin=name, version=version, error=str(exc)
                )

    def _discover(self) -> None:
        found, notes = discover_all(
            plugin_path=self.settings.plugin_folders,
            cache_dir=self.settings.data_dir / "plugin-cache",
        )
        self.notes = notes
        self.candidates = defaultdict(dict)
        for candidate in found:
            self.candidates[candidate.manifest.name].setdefault(
                candidate.manifest.version, candidate
            )

    def _choose(self, rows: dict[str, _Row]) -> dict[str, tuple[Manifest, Candidate | None]]:
        """Per name: the built-in, else the version the table serves, else the newest found."""
        chosen: dict[str, tuple[Manifest, Candidate | None]] = {
            m.name: (m, None) for m in BUILTIN_MANIFESTS
        }
        for name, versions in sorted(self.candidates.items()):
            if name in chosen:
                self.notes.append(f"plugin {name!r} has the name of a built-in; ignored")
                continue
            row = rows.get(name)
            pick = versions.get(row.version) if row is not None else None
            if pick is None:
                pick = max(versions.values(), key=lambda c: c.manifest.parsed_version)
            chosen[name] = (pick.manifest, pick)
        return chosen

    def _ordered(
        self, chosen: dict[str, tuple[Manifest, Candidate | None]]
    ) -> Iterator[tuple[Manifest, Candidate | None]]:
        """``chosen`` in dependency order; a plugin that breaks a rule is refused, not all."""
        remaining = dict(chosen)
        while remaining:
            try:
                order = load_order(
                    [manifest for manifest, _ in remaining.values()], api_version=API_VERSION
                )
            except PluginError as exc:
                manifest, candidate = remaining.pop(exc.plugin_name)
                self._refuse(manifest, candidate, str(exc))
                continue
            for manifest in order:
                yield remaining[manifest.name]
            return

    def _refuse(self, manifest: Manifest, candidate: Candidate | None, error: str) -> None:
        self.refused[manifest.name] = _Refusal(
            name=manifest.name,
            version=manifest.version,
            type=manifest.type.value,
            source=candidate.source if candidate else "builtin",
            error=error,
            trusted=manifest.trusted,
            root=str(candidate.root) if candidate else None,
            checksum=hashlib.sha256(candidate.manifest_bytes).hexdigest() if candidate else None,
        )
        log.warning("plugin_refused", plugin=manifest.name, version=manifest.version, error=error)

    def _load(self, manifest: Manifest, candidate: Candidate | None, row: _Row | None) -> None:
        try:
            loaded = (
                load_builtin(manifest)
                if candidate is None
                else load_candidate(candidate, self.settings)
            )
        except PluginError as exc:
            self._refuse(manifest, candidate, str(exc))
            return
        config = self._config_of(manifest.name, row)
        try:
            validate_config(loaded, config)
        except PluginError as exc:
            refusal = self.refused[manifest.name] = _Refusal(
                name=manifest.name,
                version=manifest.version,
                type=manifest.type.value,
                source=loaded.source,
                error=f"needs config: {exc}" if not config else str(exc),
                trusted=manifest.trusted,
                root=str(loaded.root) if loaded.root else None,
                checksum=loaded.checksum,
                # Not configured at all: waiting for its config, not broken.
                needs_config=not config,
            )
            refusal.extra["config"] = config
            return
        enabled = row.enabled if row is not None else True
        self._serve(
            Served(
                loaded=loaded,
                state="active" if enabled else "disabled",
                enabled=enabled,
                queue=self.queue_of(manifest),
                config=config,
                generation=row.generation if row is not None else 0,
            )
        )

    def _serve(self, served: Served) -> None:
        self.served[served.name] = served
        for listener in self._listeners:
            listener(served)

    def _config_of(self, name: str, row: _Row | None) -> dict[str, Any]:
        if name in self.settings.plugin_config:
            return dict(self.settings.plugin_config[name])
        return dict(row.config) if row is not None else {}

    def queue_of(self, manifest: Manifest) -> str:
        """The queue ``manifest``'s tasks go to."""
        if manifest.name in self.settings.plugin_queues:
            return self.settings.plugin_queues[manifest.name]
        if not manifest.trusted:
            return self.settings.sandbox_queue
        return manifest.queue or f"plugins.{manifest.name}"

    # -- the plugins table --------------------------------------------------------------------

    def _read_rows(self) -> dict[str, _Row]:
        if not self._db:
            return {}
        try:
            with session_scope(self.settings.sqlalchemy_url) as session:
                return {
                    row.name: _Row(
                        name=row.name,
                        version=row.version,
                        state=row.state,
                        enabled=row.enabled,
                        checksum=row.checksum,
                        root=row.root,
                        config=dict(row.config or {}),
                        generation=row.generation,
                        error=row.error,
                        source=row.source,
                    )
                    for row in session.scalars(select(Plugin))
                }
        except (OperationalError, ProgrammingError, TransientError) as exc:
            text = str(exc)
            if isinstance(exc, TransientError) and not any(
                marker in text for marker in ("no such table", "does not exist")
            ):
                raise
            # An unmigrated database: serve the plugins, keep no state (``cul8er db upgrade``).
            log.warning("plugins_table_missing", hint="run: cul8er db upgrade")
            self._db = False
            return {}

    def _sync_rows(self, rows: dict[str, _Row]) -> None:
        """Write what this boot found where it differs from the table."""
        if not self._db:
            return
        for served in self.served.values():
            row = rows.get(served.name)
            root = str(served.loaded.root) if served.loaded.root else None
            source = served.loaded.source
            same_copy = row is not None and (row.root, row.checksum) == (
                root,
                served.loaded.checksum,
            )
            if row is not None and row.source and same_copy:
                source = row.source  # where it came from (git@commit, a registry), not the copy
            self._upsert(
                served.name,
                row,
                state=served.state,
                enabled=served.enabled,
                error=None,
                manifest=served.loaded.manifest,
                source=source,
                root=str(served.loaded.root) if served.loaded.root else None,
                checksum=served.loaded.checksum,
                queue=served.queue,
                config=served.config,
            )
        for refusal in self.refused.values():
            row = rows.get(refusal.name)
            if row is not None and row.state == "active" and row.version != refusal.version:
                continue  # another version serves; this one is just not loadable here
            self._upsert(
                refusal.name,
                row,
                state="disabled" if refusal.needs_config else "failed",
                enabled=False if refusal.needs_config else (row.enabled if row else True),
                error=refusal.error,
                manifest=None,
                refusal=refusal,
            )

    def _upsert(
        self,
        name: str,
        row: _Row | None,
        *,
        state: str,
        enabled: bool,
        error: str | None,
        manifest: Manifest | None,
        source: str = "",
        root: str | None = None,
        checksum: str | None = None,
        queue: str = "",
        config: dict[str, Any] | None = None,
        refusal: _Refusal | None = None,
    ) -> None:
        if refusal is not None:
            version, ptype, source, root, checksum, trusted = (
                refusal.version,
                refusal.type,
                refusal.source,
                refusal.root,
                refusal.checksum,
                refusal.trusted,
            )
            queue = f"plugins.{name}"
            config = refusal.extra.get("config", {})
        else:
            assert manifest is not None
            version, ptype, trusted = manifest.version, manifest.type.value, manifest.trusted
        values = {
            "version": version,
            "type": ptype,
            "state": state,
            "enabled": enabled,
            "trusted": trusted,
            "checksum": checksum,
            "source": source,
            "root": root,
            "queue": queue,
            "config": config or {},
            "error": error,
        }
        try:
            with session_scope(self.settings.sqlalchemy_url) as session:
                self._write_row(session, name, values)
        except IntegrityError:
            # Another process inserted the row at the same moment: its view is the same.
            return

    def _write_row(self, session: Session, name: str, values: dict[str, Any]) -> None:
        """Insert or update the plugin's row; each state it went through is audited."""
        state, version, error = values["state"], values["version"], values["error"]
        current = session.get(Plugin, name, with_for_update=True)
        if current is None:
            session.add(Plugin(name=name, generation=1, **values))
            for step in ("discovered", "validated", "loaded", state):
                if step != "discovered" and state == "failed" and step != "failed":
                    continue
                self._record(session, name, None, step, version, error)
            return
        if all(getattr(current, key) == value for key, value in values.items()):
            return
        old = current.state
        for key, value in values.items():
            setattr(current, key, value)
        current.generation += 1
        if old != state:
            self._record(session, name, old, state, version, error)

    @staticmethod
    def _record(
        session: Any, name: str, old: str | None, new: str, version: str, error: str | None
    ) -> None:
        session.add(
            AuditEvent(
                tenant_id=None,
                kind="plugin.state_changed",
                data={"plugin": name, "from": old, "to": new, "version": version, "error": error},
            )
        )

    def refresh(self, *, force: bool = False) -> None:
        """Apply the table's changes (enable, disable, reload) if the view is stale."""
        self.boot()
        if not self._db:
            return
        now = time.monotonic()
        if not force and now - self._checked_at < self.settings.plugin_state_ttl:
            return
        with self._lock:
            rows = self._read_rows()
            self._read_pinned()
            self._checked_at = now
            for name, row in rows.items():
                served = self.served.get(name)
                if served is None or row.generation == served.generation:
                    continue
                self._apply(served, row)

    def _apply(self, served: Served, row: _Row) -> None:
        changed_version = row.checksum != served.loaded.checksum or (
            row.version != served.loaded.version
        )
        if changed_version and row.root:
            try:
                served = self._load_version(served, row)
            except PluginError as exc:
                # The old version keeps serving; the table says why the new one did not load.
                log.error(
                    "plugin_reload_failed", plugin=row.name, version=row.version, error=str(exc)
                )
                served.generation = row.generation
                return
        served.enabled = row.enabled
        served.state = row.state if row.state in ("active", "disabled", "failed") else served.state
        served.config = self._config_of(row.name, row)
        served.generation = row.generation
        served.error = row.error
        if changed_version:
            served.builds.clear()
        log.info("plugin_state_applied", plugin=row.name, version=row.version, state=served.state)

    def _load_version(self, served: Served, row: _Row) -> Served:
        from pathlib import Path

        from workers.pluginhost.discovery import read_candidate

        assert row.root is not None
        candidate = read_candidate(f"path:{row.root}", Path(row.root))
        loaded = load_candidate(candidate, self.settings)
        validate_config(loaded, self._config_of(row.name, row))
        fresh = Served(
            loaded=loaded,
            state=row.state,
            enabled=row.enabled,
            queue=self.queue_of(loaded.manifest),
            config=self._config_of(row.name, row),
            generation=row.generation,
        )
        self._serve(fresh)
        return fresh

    # -- calls --------------------------------------------------------------------------------

    def get(self, name: str) -> Served:
        """The plugin ``name`` if it serves now.

        Raises:
            PluginUnavailableError: disabled, failed, refused or unknown (says which, and why).
        """
        self.refresh()
        served = self.served.get(name)
        if served is None:
            refusal = self.refused.get(name)
            if refusal is not None:
                raise PluginUnavailableError(
                    f"plugin {name!r} is not loaded: {refusal.error}", plugin_name=name
                )
            known = ", ".join(sorted(self.served))
            raise PluginUnavailableError(
                f"plugin {name!r} is not installed; installed: {known}", plugin_name=name
            )
        if served.state != "active":
            why = f": {served.error}" if served.error else ""
            raise PluginUnavailableError(
                f"plugin {name!r} is {served.state}{why}", plugin_name=name
            )
        return served

    def instance(
        self,
        served: Served,
        *,
        resolve: Callable[[Any], Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> Any:
        """The plugin object built from ``config`` (default: the plugin's), ``${secret:}``
        references resolved by ``resolve`` now; built again only when that resolved config
        changed."""
        raw = served.config if config is None else config
        resolved = resolve(raw) if resolve is not None else raw
        digest = hashlib.sha256(
            json.dumps(resolved, sort_keys=True, default=str).encode()
        ).hexdigest()
        with self._lock:
            if digest in served.builds:
                return served.builds[digest]
            model = validate_config(served.loaded, resolved)
            built = build_instance(served.loaded, model, self.context(served.loaded))
            if len(served.builds) >= _BUILDS_KEPT:
                served.builds.pop(next(iter(served.builds)))
            served.builds[digest] = built
            return built

    # -- tenants' versions --------------------------------------------------------------------

    def for_tenant(
        self, served: Served, tenant_id: str | None, *, lookup: bool = True
    ) -> tuple[Served, dict[str, Any]]:
        """The version of ``served``'s plugin that ``tenant_id`` runs, and its config.

        ``lookup=False`` answers without reading the table (the plugin's own version).
        """
        if not tenant_id or not lookup or not self._db or served.name not in self.pinned:
            return served, served.config
        choice = tenant_choice(self.settings.sqlalchemy_url, served.name, tenant_id)
        if choice is None:
            return served, served.config
        version, overrides = choice
        chosen = served
        if version is not None and version != served.loaded.version:
            chosen = self.version(served.name, version)
        return chosen, {**served.config, **overrides} if overrides else served.config

    def installed_versions(self, name: str) -> list[str]:
        """Every version of ``name`` on disk here (looked for again), oldest first."""
        with self._lock:
            self._discover()
            found = self.candidates.get(name, {})
            served = self.served.get(name)
            versions = set(found)
            if served is not None:
                versions.add(served.loaded.version)
        return sorted(versions, key=_semver_key)

    def version(self, name: str, version: str) -> Served:
        """``version`` of plugin ``name``, loaded beside the one it serves if need be.

        Raises:
            PluginUnavailableError: the plugin does not serve, or that version is not on disk
                here, or does not load (naming why).
        """
        default = self.get(name)
        if default.loaded.version == version:
            return default
        return self._beside(default, version)

    def _beside(self, default: Served, version: str) -> Served:
        """``version`` of ``default``'s plugin, loaded (once) beside ``default``."""
        name = default.name
        with self._lock:
            found = self.versions.get((name, version))
            if found is not None:
                return found
            candidate = self.candidates.get(name, {}).get(version)
            if candidate is None:
                self._discover()
                candidate = self.candidates.get(name, {}).get(version)
            if candidate is None:
                have = ", ".join(sorted(self.candidates.get(name, {}))) or "none"
                raise PluginUnavailableError(
                    f"plugin {name!r} {version} is not installed here; found: {have}",
                    plugin_name=name,
                )
            try:
                loaded = load_candidate(candidate, self.settings)
                validate_config(loaded, default.config)
            except PluginError as exc:
                raise PluginUnavailableError(
                    f"plugin {name!r} {version} does not load: {exc}", plugin_name=name
                ) from exc
            served = Served(
                loaded=loaded,
                state="active",
                enabled=True,
                queue=default.queue,
                config=default.config,
                generation=default.generation,
            )
            self.versions[(name, version)] = served
            log.info("plugin_version_loaded", plugin=name, version=version)
            return served

    def context(self, loaded: LoadedPlugin) -> PluginContext:
        """The context handed to ``loaded``'s factory."""
        return PluginContext(
            name=loaded.name,
            version=loaded.version,
            data_dir=self.settings.data_dir / "plugin-data" / loaded.name,
            settings=self.settings,
        )

    def status(self) -> list[dict[str, Any]]:
        """Every plugin with its version, type, state and error, sorted by name."""
        self.refresh(force=True)
        views: dict[str, dict[str, Any]] = {}
        for name, refusal in self.refused.items():
            views[name] = {
                "name": name,
                "version": refusal.version,
                "type": refusal.type,
                "state": "disabled" if refusal.needs_config else "failed",
                "trusted": refusal.trusted,
                "source": refusal.source,
                "queue": f"plugins.{name}",
                "error": refusal.error,
            }
        for name, served in self.served.items():
            views[name] = {
                "name": name,
                "version": served.loaded.version,
                "type": served.loaded.manifest.type.value,
                "state": served.state,
                "trusted": served.trusted,
                "source": served.loaded.source,
                "queue": served.queue,
                "error": served.error,
            }
        return [views[name] for name in sorted(views)]
