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

from workers.engine.instances import (
    SHARED_TENANT_ID,
    TENANT_ID_PATTERN,
    check_tenant_id,
    health_report,
    instance_name,
    instance_spec,
    probe,
)
from workers.pluginhost.context import PluginContext
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
from workers.runtime.redaction import remember
from workers.runtime.settings import Settings, get_settings
from workers.runtime.waiting import wait_until

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
