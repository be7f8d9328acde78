"""Typed handles on plugins for cul8er's own code: ``get_platform``, ``get_provisioner``.

A handle is a proxy: each operation goes through ``invoke``, so it runs in this process
when this worker serves the plugin, and as the plugin's task on its own queue otherwise
(the sandbox for untrusted plugins, the workers next to an engine for a routed platform).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, cast

from schemas.manifest import PluginType
from workers.pluginhost.contracts import check_contract, operations
from workers.pluginhost.signatures import signature
from workers.runtime.errors import ConfigError
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from workers.pluginhost.contracts import LoadBalancer, Platform, Strategy, TenantProvisioner
    from workers.runtime.settings import Settings

__all__ = [
    "BUILTIN_PLATFORMS",
    "PluginProxy",
    "check_platform",
    "get_load_balancer",
    "get_platform",
    "get_provisioner",
    "get_strategy",
    "plugin_names",
]

#: Built-in platforms: name → ``module:Class``, for code that builds one outside the registry.
BUILTIN_PLATFORMS: Final[dict[str, str]] = {
    "local": "plugins.platforms.local:LocalPlatform",
    "docker": "plugins.platforms.docker:DockerPlatform",
    "incus": "plugins.platforms.incus:IncusPlatform",
}

_direct: dict[tuple[str, int], Any] = {}


def check_platform(name: str, cls: type) -> None:
    """Refuse a platform class that lacks an operation or takes the wrong arguments."""
    check_contract(name, PluginType.PLATFORM, cls)


class PluginProxy:
    """A plugin's contract as methods; each call goes through ``invoke``."""

    def __init__(self, name: str, plugin_type: PluginType) -> None:
        self.name = name
        self.plugin_type = plugin_type
        self._ops = frozenset(operations(plugin_type))

    def __getattr__(self, op: str) -> Any:
        if op.startswith("_") or op not in self._ops:
            raise AttributeError(op)
        sig = signature(self.plugin_type, op)

        def call(*args: Any, **kwargs: Any) -> Any:
            return _calls().invoke(self.name, op, **sig.bind(*args, **kwargs))

        call.__name__ = op
        return call

    def __repr__(self) -> str:
        return f"<plugin {self.name} ({self.plugin_type.value})>"


def _calls() -> ModuleType:
    """The call path, imported on first use: it builds the Celery app, and a plugin that
    imports the plugin API (which names :func:`get_platform`) must not pay for that."""
    from workers.pluginhost import calls

    return calls


def _handle(name: str, plugin_type: PluginType) -> PluginProxy:
    served = _calls().registry().get(name)
    if served.loaded.manifest.type is not plugin_type:
        raise ConfigError(
            f"plugin {name!r} is a {served.loaded.manifest.type.value} plugin, "
            f"not a {plugin_type.value} plugin"
        )
    return PluginProxy(name, plugin_type)


def plugin_names(plugin_type: PluginType, *, refresh: bool = True) -> list[str]:
    """The active plugins of ``plugin_type``, sorted.

    ``refresh=False`` answers from this process's view, without reading the table: for
    callers inside a transaction of their own (SQLite lets one writer in at a time).
    """
    reg = _calls().registry()
    if refresh:
        reg.refresh()
    return sorted(
        name
        for name, served in reg.served.items()
        if served.loaded.manifest.type is plugin_type and served.state == "active"
    )


def get_platform(name: str, settings: Settings) -> Platform:
    """The platform ``name``: the active plugin for this process's settings.

    With other settings (a benchmark, a test on its own data dir) a built-in platform is
    built directly for them, outside the registry.

    Raises:
        ConfigError: ``name`` is not a platform plugin.
        PluginError: the plugin is disabled, failed or not installed.
    """

    if settings is get_settings():
        return cast("Platform", _handle(name, PluginType.PLATFORM))
    key = (name, id(settings))
    if key not in _direct:
        if name not in BUILTIN_PLATFORMS:
            known = ", ".join(sorted(BUILTIN_PLATFORMS))
            raise ConfigError(f"unknown platform {name!r}; known platforms: {known}")
        module_name, _, attr = BUILTIN_PLATFORMS[name].partition(":")
        cls: Any = getattr(importlib.import_module(module_name), attr)
        check_platform(name, cls)
        _direct[key] = cls.from_settings(settings)
    return cast("Platform", _direct[key])


def get_provisioner(name: str) -> TenantProvisioner:
    """The tenant provisioner ``name`` (an active plugin).

    Raises:
        ConfigError: ``name`` is not a provisioner plugin.
        PluginError: the plugin is disabled, failed or not installed.
    """
    return cast("TenantProvisioner", _handle(name, PluginType.TENANT_PROVISIONER))


def get_strategy(name: str) -> Strategy:
    """The deployment strategy ``name`` (an active plugin)."""
    return cast("Strategy", _handle(name, PluginType.STRATEGY))


def get_load_balancer(name: str) -> LoadBalancer:
    """The load balancer ``name`` (an active plugin)."""
    return cast("LoadBalancer", _handle(name, PluginType.LOAD_BALANCER))
