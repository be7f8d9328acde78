"""The plugin API: everything a plugin's code may import from cul8er, and nothing else.

Built-in plugins under ``plugins/`` import only this module, ``schemas`` and their own
package (an import contract checked in CI); a third-party plugin should do the same. The
names here are the stable surface behind ``API_VERSION``: what moves inside cul8er's rooms
is re-exported here under the same name.

- the context a factory receives: :class:`PluginContext` (with :class:`Settings`);
- the error classes that tell cul8er how to treat a failure (retry or not);
- the contracts a plugin implements, as typing protocols (:class:`Platform`, ...);
- helpers: another plugin's platform (:func:`get_platform`), a pooled SQLAlchemy engine
  (:func:`get_engine`), secret hygiene
  (:func:`remember`, :func:`check_path`), instance naming, specs and health
  (:func:`instance_spec`, :func:`health_report`, :func:`check_tenant_id`), Prometheus
  metrics (:mod:`metrics <workers.runtime.metrics>`) and :func:`wait_until`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

from workers.pluginhost.context import PluginContext
from workers.runtime.errors import (
    ConfigError,
    ConflictError,
    Cul8erError,
    NotFoundError,
    PermanentError,
    PluginError,
    TransientError,
    ValidationFailedError,
)

if TYPE_CHECKING:
    from workers.engine.instances import (
        SHARED_TENANT_ID,
        TENANT_ID_PATTERN,
        check_tenant_id,
        health_report,
        instance_name,
        instance_spec,
        probe,
    )
    from workers.pluginhost.contracts import (
        LoadBalancer,
        Observer,
        Platform,
        Secrets,
        Strategy,
        TenantProvisioner,
    )
    from workers.pluginhost.handles import get_platform
    from workers.pluginhost.registry import API_VERSION
    from workers.pluginhost.secrets import check_path
    from workers.runtime import metrics
    from workers.runtime.db import get_engine
    from workers.runtime.redaction import remember
    from workers.runtime.settings import Settings, get_settings
    from workers.runtime.waiting import wait_until

#: Names loaded on first use, ``name: (module, attribute or None for the module itself)``: a
#: plugin pays at import only for what it uses (Prometheus, SQLAlchemy, the registry...).
_LAZY: Final[dict[str, tuple[str, str | None]]] = {
    **{
        name: ("workers.engine.instances", name)
        for name in (
            "SHARED_TENANT_ID",
            "TENANT_ID_PATTERN",
            "check_tenant_id",
            "health_report",
            "instance_name",
            "instance_spec",
            "probe",
        )
    },
    **{
        name: ("workers.pluginhost.contracts", name)
        for name in (
            "LoadBalancer",
            "Observer",
            "Platform",
            "Secrets",
            "Strategy",
            "TenantProvisioner",
        )
    },
    "get_platform": ("workers.pluginhost.handles", "get_platform"),
    "API_VERSION": ("workers.pluginhost.registry", "API_VERSION"),
    "check_path": ("workers.pluginhost.secrets", "check_path"),
    "metrics": ("workers.runtime.metrics", None),
    "get_engine": ("workers.runtime.db", "get_engine"),
    "remember": ("workers.runtime.redaction", "remember"),
    "Settings": ("workers.runtime.settings", "Settings"),
    "get_settings": ("workers.runtime.settings", "get_settings"),
    "wait_until": ("workers.runtime.waiting", "wait_until"),
}


def __getattr__(name: str) -> Any:
    """Load a name of :data:`_LAZY` on first use and keep it."""
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


__all__ = [
    "API_VERSION",
    "ConfigError",
    "ConflictError",
    "Cul8erError",
    "LoadBalancer",
    "NotFoundError",
    "Observer",
    "PermanentError",
    "Platform",
    "PluginContext",
    "PluginError",
    "SHARED_TENANT_ID",
    "Secrets",
    "Settings",
    "Strategy",
    "TENANT_ID_PATTERN",
    "TenantProvisioner",
    "TransientError",
    "ValidationFailedError",
    "check_path",
    "check_tenant_id",
    "get_engine",
    "get_platform",
    "get_settings",
    "health_report",
    "instance_name",
    "instance_spec",
    "metrics",
    "probe",
    "remember",
    "wait_until",
]
