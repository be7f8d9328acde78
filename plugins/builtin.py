"""The built-in plugins' manifests: data only, so listing them imports no plugin code.

Built-ins ship inside the cul8er distribution, so their files are covered by the
package install rather than by per-file hashes; everything else (contract check,
config model, tasks, lifecycle in the ``plugins`` table) is the same as for a
third-party plugin.
"""

from __future__ import annotations

from typing import Final

from schemas.manifest import Manifest, Permission, PluginType

__all__ = ["BUILTIN_MANIFESTS", "builtin_manifest"]

_NET, _EXEC, _FS, _DB, _SECRETS = (
    Permission.NETWORK,
    Permission.EXEC,
    Permission.FILESYSTEM,
    Permission.DATABASE,
    Permission.SECRETS,
)


def _builtin(
    name: str,
    plugin_type: PluginType,
    module: str,
    factory: str,
    *,
    permissions: frozenset[Permission],
    config: str | None = None,
    description: str,
) -> Manifest:
    return Manifest(
        name=name,
        version="1.0.0",
        type=plugin_type,
        description=description,
        module=module,
        factory=factory,
        config_model=f"{module}:{config}" if config else None,
        permissions=permissions,
        trusted=True,
    )


#: Every built-in, in a stable order; each is a task module like any plugin.
BUILTIN_MANIFESTS: Final[tuple[Manifest, ...]] = (
    _builtin(
        "local",
        PluginType.PLATFORM,
        "plugins.platforms.local",
        "LocalPlatform.from_plugin",
        permissions=frozenset({_EXEC, _FS, _NET}),
        description="Each instance a supervised local process under cgroup or rlimit limits.",
    ),
    _builtin(
        "docker",
        PluginType.PLATFORM,
        "plugins.platforms.docker",
        "DockerPlatform.from_plugin",
        permissions=frozenset({_NET}),
        description="Containers on a Docker engine, ports published on 127.0.0.1.",
    ),
    _builtin(
        "incus",
        PluginType.PLATFORM,
        "plugins.platforms.incus",
        "IncusPlatform.from_plugin",
        permissions=frozenset({_NET}),
        description="System containers on Incus or LXD through pylxd.",
    ),
    _builtin(
        "container_per_tenant",
        PluginType.TENANT_PROVISIONER,
        "plugins.provisioners.container_per_tenant",
        "ContainerPerTenant",
        permissions=frozenset({_NET, _DB}),
        description="Dedicated instances per tenant on the tenant's platform.",
    ),
    _builtin(
        "database_per_tenant",
        PluginType.TENANT_PROVISIONER,
        "plugins.provisioners.database_per_tenant",
        "DatabasePerTenant",
        permissions=frozenset({_DB, _FS}),
        config="DatabasePerTenantConfig",
        description="A PostgreSQL database or schema per tenant; a SQLite file when embedded.",
    ),
    _builtin(
        "shared_cluster",
        PluginType.TENANT_PROVISIONER,
        "plugins.provisioners.shared_cluster",
        "SharedCluster",
        permissions=frozenset({_NET, _DB}),
        config="SharedClusterConfig",
        description="Tenants placed on one shared pool of instances per platform.",
    ),
    _builtin(
        "env",
        PluginType.SECRETS,
        "plugins.secrets.env",
        "EnvSecrets",
        permissions=frozenset(),
        config="EnvSecretsConfig",
        description="Secrets from environment variables (CUL8ER_SECRET_<PATH>).",
    ),
    _builtin(
        "file",
        PluginType.SECRETS,
        "plugins.secrets.file",
        "FileSecrets",
        permissions=frozenset({_FS}),
        config="FileSecretsConfig",
        description="Secrets in a local file, each value encrypted (Fernet) by a settings key.",
    ),
    _builtin(
        "haproxy",
        PluginType.LOAD_BALANCER,
        "plugins.load_balancers.haproxy",
        "HAProxy.from_plugin",
        permissions=frozenset({_NET, _FS, _EXEC}),
        description="A 127.0.0.1 frontend per tenant on HAProxy, driven by its runtime API.",
    ),
    *(
        _builtin(
            name,
            PluginType.STRATEGY,
            f"plugins.strategies.{name}",
            factory,
            permissions=frozenset(),
            description=description,
        )
        for name, factory, description in (
            ("direct", "Direct", "Replace every instance at once, behind a full surge."),
            (
                "rolling",
                "Rolling",
                "Replace instances batch by batch: max_surge, max_unavailable.",
            ),
            ("blue_green", "BlueGreen", "A preview stack, analysis, one switch, a warm old stack."),
            ("canary", "Canary", "Weight steps with pauses and analysis: 10 %, then +20 % a step."),
            (
                "ab_test",
                "ABTest",
                "A header or cookie picks the new release; promote on analysis.",
            ),
        )
    ),
    _builtin(
        "log",
        PluginType.OBSERVER,
        "plugins.observers.log",
        "LogObserver",
        permissions=frozenset(),
        description="Every event and metric as a structlog line.",
    ),
    _builtin(
        "webhook",
        PluginType.OBSERVER,
        "plugins.observers.webhook",
        "WebhookObserver",
        permissions=frozenset({_NET, _SECRETS}),
        config="WebhookConfig",
        description="HTTP POST of every event with an Idempotency-Key header, with retries.",
    ),
    _builtin(
        "prometheus",
        PluginType.OBSERVER,
        "plugins.observers.prometheus",
        "PrometheusObserver",
        permissions=frozenset({_NET, _FS}),
        description="Metrics a Prometheus server scrapes from multi-process workers.",
    ),
)

_BY_NAME: Final = {m.name: m for m in BUILTIN_MANIFESTS}


def builtin_manifest(name: str) -> Manifest | None:
    """The built-in plugin called ``name``, if there is one."""
    return _BY_NAME.get(name)
