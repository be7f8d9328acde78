"""Load one plugin: trust checks first, then its module under a name of its own, then its contract.

Nothing of a plugin runs before its files hash to what its manifest says (and, when required,
the manifest is signed). Each version is imported under its own module name
(``_cul8er_plugin_<name>_<digest>``), so two versions of one plugin can live in one process: a
reload imports the new one beside the old, which keeps serving until the new one passed.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from workers.pluginhost.contracts import check_contract
from workers.pluginhost.trust import check_imports, verify_checksums, verify_signature
from workers.runtime.errors import PluginError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import ModuleType

    from schemas.manifest import Manifest
    from workers.pluginhost.context import PluginContext
    from workers.pluginhost.discovery import Candidate
    from workers.runtime.settings import Settings

__all__ = ["LoadedPlugin", "build_instance", "load_builtin", "load_candidate", "validate_config"]


@dataclass
class LoadedPlugin:
    """A plugin whose code is imported and whose contract holds; not yet built."""

    manifest: Manifest
    source: str
    #: The folder it was loaded from; ``None`` for built-ins.
    root: Path | None
    #: sha256 of the manifest's bytes (which carry every file's hash); ``None`` for built-ins.
    checksum: str | None
    module: ModuleType
    factory: Callable[..., Any]
    config_model: type[BaseModel] | None
    signed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The plugin's name."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """The plugin's version."""
        return self.manifest.version


def _trusted_keys(settings: Settings) -> list[bytes]:
    return [base64.b64decode(key) for key in settings.plugin_trusted_keys]


def _alias(manifest: Manifest, checksum: str) -> str:
    return f"_cul8er_plugin_{manifest.name}_{checksum[:12]}"


def _import_from(root: Path, manifest: Manifest, alias: str) -> ModuleType:
    """Import ``manifest.module`` found in ``root`` as ``alias`` (plus its dotted rest)."""
    top, _, rest = manifest.module.partition(".")
    if root.name == top and (root / "__init__.py").is_file():
        location, package = root / "__init__.py", root  # the root is the package (entry point)
    elif (root / top / "__init__.py").is_file():
        location, package = root / top / "__init__.py", root / top
    elif (root / f"{top}.py").is_file() and not rest:
        location, package = root / f"{top}.py", None
    else:
        raise PluginError(
            f"plugin {manifest.name!r}: module {manifest.module!r} is not in {root}",
            plugin_name=manifest.name,
        )
    if alias not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            alias,
            location,
            submodule_search_locations=[str(package)] if package is not None else None,
        )
        if spec is None or spec.loader is None:
            raise PluginError(
                f"plugin {manifest.name!r}: cannot import {location}", plugin_name=manifest.name
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules[alias] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[alias]
            raise
    return importlib.import_module(f"{alias}.{rest}" if rest else alias)


def _attribute(module: ModuleType, dotted: str, manifest: Manifest, what: str) -> Any:
    value: Any = module
    for part in dotted.split("."):
        value = getattr(value, part, None)
        if value is None:
            raise PluginError(
                f"plugin {manifest.name!r}: {what} {dotted!r} not found in {manifest.module}",
                plugin_name=manifest.name,
            )
    return value


def _contract_class(module: ModuleType, manifest: Manifest) -> type | None:
    """The class the factory builds: the factory itself, or the class it is a method of."""
    factory = _attribute(module, manifest.factory, manifest, "factory")
    if inspect.isclass(factory):
        return factory
    parent = (
        _attribute(module, manifest.factory.rpartition(".")[0], manifest, "factory")
        if "." in manifest.factory
        else None
    )
    return parent if inspect.isclass(parent) else None


def _finish(
    manifest: Manifest,
    module: ModuleType,
    *,
    source: str,
    root: Path | None,
    checksum: str | None,
    signed: bool,
    config_module: Callable[[str], ModuleType],
) -> LoadedPlugin:
    cls = _contract_class(module, manifest)
    if cls is not None:
        check_contract(manifest.name, manifest.type, cls)
    config_model = None
    if manifest.config_model:
        module_name, _, attr = manifest.config_model.partition(":")
        config_model = _attribute(config_module(module_name), attr, manifest, "config model")
        if not (inspect.isclass(config_model) and issubclass(config_model, BaseModel)):
            raise PluginError(
                f"plugin {manifest.name!r}: config model {manifest.config_model!r} is not a "
                "pydantic model",
                plugin_name=manifest.name,
            )
    return LoadedPlugin(
        manifest=manifest,
        source=source,
        root=root,
        checksum=checksum,
        module=module,
        factory=_attribute(module, manifest.factory, manifest, "factory"),
        config_model=config_model,
        signed=signed,
    )


def load_builtin(manifest: Manifest) -> LoadedPlugin:
    """Import a built-in plugin (shipped inside cul8er) and check its contract."""
    try:
        module = importlib.import_module(manifest.module)
    except ImportError as exc:
        raise PluginError(
            f"built-in plugin {manifest.name!r} cannot be imported: {exc}",
            plugin_name=manifest.name,
        ) from exc
    return _finish(
        manifest,
        module,
        source="builtin",
        root=None,
        checksum=None,
        signed=False,
        config_module=importlib.import_module,
    )


def verify_candidate(candidate: Candidate, settings: Settings) -> bool:
    """Checksums, signature and the static import check; whether the manifest is signed."""
    manifest = candidate.manifest
    verify_checksums(manifest, candidate.root)
    signed = verify_signature(
        manifest.name,
        candidate.manifest_bytes,
        candidate.signature,
        _trusted_keys(settings),
        required=settings.require_signed_plugins,
    )
    check_imports(manifest, candidate.root)
    return signed


def load_candidate(candidate: Candidate, settings: Settings) -> LoadedPlugin:
    """Verify ``candidate`` and import it under a module name of its own version.

    Raises:
        PluginError: a trust check, the import or the contract check failed.
    """
    manifest = candidate.manifest
    signed = verify_candidate(candidate, settings)
    checksum = hashlib.sha256(candidate.manifest_bytes).hexdigest()
    alias = _alias(manifest, checksum)
    top = manifest.module.partition(".")[0]

    def config_module(name: str) -> ModuleType:
        # The config model lives in the plugin's own code: import it under the same alias.
        head, _, rest = name.partition(".")
        if head != top:
            return importlib.import_module(name)
        return importlib.import_module(f"{alias}.{rest}" if rest else alias)

    try:
        module = _import_from(candidate.root, manifest, alias)
        return _finish(
            manifest,
            module,
            source=candidate.source,
            root=candidate.root,
            checksum=checksum,
            signed=signed,
            config_module=config_module,
        )
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(
            f"plugin {manifest.name!r} failed to import: {type(exc).__name__}: {exc}",
            plugin_name=manifest.name,
        ) from exc


def validate_config(plugin: LoadedPlugin, config: dict[str, Any]) -> BaseModel | None:
    """``config`` checked by the plugin's model.

    Raises:
        PluginError: naming each invalid field (never a value).
    """
    if plugin.config_model is None:
        if config:
            raise PluginError(
                f"plugin {plugin.name!r} takes no config, got: {', '.join(sorted(config))}",
                plugin_name=plugin.name,
            )
        return None
    try:
        return plugin.config_model.model_validate(config)
    except ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PluginError(
            f"plugin {plugin.name!r} config: {fields}", plugin_name=plugin.name
        ) from None


def build_instance(plugin: LoadedPlugin, config: BaseModel | None, context: PluginContext) -> Any:
    """Call the plugin's factory and its ``self_test``; the object serving its operations.

    Raises:
        PluginError: the factory or the self-test raised.
    """
    try:
        instance = plugin.factory(config, context)
        self_test = getattr(instance, "self_test", None)
        if callable(self_test):
            self_test()
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(
            f"plugin {plugin.name!r} {plugin.version} did not start: {type(exc).__name__}: {exc}",
            plugin_name=plugin.name,
        ) from exc
    if plugin.manifest.type is not None and _contract_class(plugin.module, plugin.manifest) is None:
        check_contract(plugin.name, plugin.manifest.type, type(instance))
    return instance
