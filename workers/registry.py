"""The built-in plugin registry: typed contracts checked when a plugin is registered.

Third-party discovery comes later; built-ins already go through the same
check, so a platform missing an operation is refused with the names missing.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from workers.contracts import PLATFORM_OPERATIONS
from workers.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from workers.contracts import Platform
    from workers.settings import Settings

__all__ = ["BUILTIN_PLATFORMS", "check_platform", "get_platform", "register_platform"]

#: Built-in platforms: name → ``module:Class``, imported on first use.
BUILTIN_PLATFORMS: Final[dict[str, str]] = {
    "local": "plugins.platforms.local:LocalPlatform",
    "docker": "plugins.platforms.docker:DockerPlatform",
    "incus": "plugins.platforms.incus:IncusPlatform",
}

PlatformFactory = Callable[["Settings"], "Platform"]

_factories: dict[str, PlatformFactory] = {}
_instances: dict[tuple[str, int], Platform] = {}


def check_platform(name: str, cls: type) -> None:
    """Refuse a platform class that lacks an operation or takes the wrong arguments."""
    missing = [op for op in PLATFORM_OPERATIONS if not callable(getattr(cls, op, None))]
    if missing:
        raise PluginError(
            f"platform {name!r} is missing operations: {', '.join(missing)}", plugin_name=name
        )
    from workers.contracts import Platform

    wrong = []
    for op in PLATFORM_OPERATIONS:
        expected = list(inspect.signature(getattr(Platform, op)).parameters)
        actual = list(inspect.signature(getattr(cls, op)).parameters)
        if actual[: len(expected)] != expected:
            wrong.append(f"{op}({', '.join(actual[1:])}) should be {op}({', '.join(expected[1:])})")
    if wrong:
        raise PluginError(
            f"platform {name!r} has wrong signatures: {'; '.join(wrong)}", plugin_name=name
        )


def register_platform(name: str, cls: type, factory: PlatformFactory) -> None:
    """Register a platform after checking it against the contract."""
    check_platform(name, cls)
    _factories[name] = factory


def _load_builtin(name: str) -> None:
    module_name, _, attr = BUILTIN_PLATFORMS[name].partition(":")
    cls: Any = getattr(importlib.import_module(module_name), attr)
    register_platform(name, cls, cls.from_settings)


def get_platform(name: str, settings: Settings) -> Platform:
    """The platform ``name`` for this process (one object per settings)."""
    key = (name, id(settings))
    platform = _instances.get(key)
    if platform is not None:
        return platform
    if name not in _factories:
        if name not in BUILTIN_PLATFORMS:
            known = ", ".join(sorted({*BUILTIN_PLATFORMS, *_factories}))
            raise ConfigError(f"unknown platform {name!r}; known platforms: {known}")
        _load_builtin(name)
    platform = _factories[name](settings)
    _instances[key] = platform
    return platform
