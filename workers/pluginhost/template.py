"""``cul8er plugin init``: a working plugin package to start from, one per plugin type."""

from __future__ import annotations

import json
import re
import textwrap
from typing import TYPE_CHECKING, Final

from schemas.manifest import PluginType
from workers.pluginhost.registry import API_VERSION
from workers.pluginhost.trust import MANIFEST_FILE, file_digests
from workers.runtime.errors import ValidationFailedError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["NAME_RULE", "plugin_name", "write_manifest", "write_plugin"]

#: What a plugin name must be once normalised (the manifest's own pattern).
NAME_RULE: Final = r"^[a-z][a-z0-9_]{0,63}$"

_IMPORTS: Final = "from schemas.plugins import Ack, HealthStatus"

#: Per type: the models it imports and its class body (a small in-memory implementation).
_BODIES: Final[dict[PluginType, tuple[str, str]]] = {
    PluginType.OBSERVER: (
        "from schemas.events import Event\n"
        "from schemas.plugins import Ack, HealthStatus, MetricSample",
        '''
    def observe_event(self, event: Event) -> Ack:
        """Count the event; a repeated delivery (same event_id) is counted once."""
        self.seen.add(str(event.event_id))
        self.log.info("event_seen", event_type=event.event_type, prefix=self.config.prefix)
        return Ack(detail=f"{self.config.prefix}{event.event_type}")

    def report_metric(self, metric: MetricSample) -> Ack:
        """Remember the latest value of each metric."""
        self.metrics[metric.name] = metric.value
        return Ack()

    def health_status(self) -> HealthStatus:
        """Always able to observe."""
        return HealthStatus(healthy=True, detail=f"{len(self.seen)} events seen")

    def flush(self) -> Ack:
        """Nothing is buffered."""
        return Ack()
''',
    ),
    PluginType.SECRETS: (
        "from pydantic import SecretStr\n\nfrom schemas.plugins import Ack, SecretValue",
        '''
    def get(self, path: str) -> SecretValue:
        """The value stored at ``path``."""
        if path not in self.store:
            raise NotFoundError(f"no secret at {path!r}")
        return SecretValue(path=path, value=SecretStr(self.store[path]))

    def put(self, path: str, value: str) -> Ack:
        """Store ``value`` (in memory: a real provider would persist it)."""
        self.store[path] = value
        return Ack()

    def rotate(self, path: str) -> SecretValue:
        """Replace the value by a fresh random one."""
        import secrets

        self.store[path] = secrets.token_urlsafe(24)
        return self.get(path)
''',
    ),
    PluginType.STRATEGY: (
        "from schemas.delivery import AnalysisConfig\n"
        "from schemas.plugins import AnalysisInput, DeploymentSpec, Stage, StagePlan, Verdict",
        '''
    def plan(self, deployment: DeploymentSpec) -> StagePlan:
        """One canary instance, a fifth of the traffic, a pause, an analysis, promote.

        The actions: create_group, set_weight, route, pause, analysis, replace, promote
        (see ``schemas.plugins.Stage``). Every plan ends with one promote; the way back
        is cul8er's, the same for every strategy.
        """
        gate = AnalysisConfig(count=3, interval_seconds=1.0)
        return StagePlan(
            stages=[
                Stage(name="create-canary", action="create_group", params={"count": 1}),
                Stage(name="weight-20", action="set_weight", weight=20),
                Stage(name="pause-20", action="pause", pause_seconds=5.0),
                Stage(
                    name="analysis-20",
                    action="analysis",
                    params={**gate.model_dump(mode="json"), "target": "canary"},
                ),
                Stage(name="promote", action="promote"),
            ]
        )

    def analyze(self, analysis: AnalysisInput) -> Verdict:
        """Fail above the configured error rate; inconclusive without traffic."""
        if analysis.metrics.get("requests", 0) < 1:
            return Verdict(decision="inconclusive", reason="no requests yet")
        errors = analysis.metrics.get("error_rate", 0.0)
        if errors > self.config.max_error_rate:
            return Verdict(decision="fail", reason=f"error rate {errors:.2%}")
        return Verdict(decision="pass", reason=f"error rate {errors:.2%}")
''',
    ),
    PluginType.LOAD_BALANCER: (
        "from schemas.plugins import (\n    Ack,\n    Backend,\n    Entry,\n    Frontend,\n"
        "    HeaderRoute,\n    HealthStatus,\n    ServerStats,\n    TrafficStats,\n    Weights,\n)",
        '''
    def ensure_frontend(self, frontend: Frontend) -> Entry:
        """Give the tenant a port once; later calls answer the same one."""
        fresh = frontend.tenant_id not in self.frontends
        if fresh:
            self.frontends[frontend.tenant_id] = frontend.port or 20000 + len(self.frontends)
        address = f"127.0.0.1:{self.frontends[frontend.tenant_id]}"
        return Entry(tenant_id=frontend.tenant_id, address=address, reloaded=fresh)

    def remove_frontend(self, tenant_id: str) -> Ack:
        """Forget the tenant, its backends, split and routes; an unknown one is fine."""
        self.frontends.pop(tenant_id, None)
        self.weights.pop(tenant_id, None)
        for key in [k for k in self.backends if k[0] == tenant_id]:
            del self.backends[key]
        for key in [k for k in self.routes if k[0] == tenant_id]:
            del self.routes[key]
        return Ack()

    def add_backend(self, backend: Backend) -> Ack:
        """Add or update a backend in its group."""
        self.backends[(backend.tenant_id, backend.name)] = backend
        return Ack()

    def remove_backend(self, backend: Backend) -> Ack:
        """Remove a backend; a missing one is fine."""
        self.backends.pop((backend.tenant_id, backend.name), None)
        return Ack()

    def set_weights(self, weights: Weights) -> Ack:
        """Record the tenant's traffic split between its groups."""
        self.weights[weights.tenant_id] = dict(weights.weights)
        return Ack()

    def route_by_header(self, route: HeaderRoute) -> Ack:
        """Record a header or cookie route; ``group=None`` clears it."""
        key = (route.tenant_id, route.header, route.cookie, route.value)
        if route.group is None:
            self.routes.pop(key, None)
        else:
            self.routes[key] = route
        return Ack()

    def stats(self, tenant_id: str) -> TrafficStats:
        """The tenant's servers (no traffic counted here), split and routes."""
        split = self.weights.get(tenant_id, {"stable": 100, "canary": 0})
        servers = [
            ServerStats(
                name=b.name, group=b.group, address=b.address, state=b.state,
                weight=split.get(b.group, 0),
            )
            for (tenant, _), b in self.backends.items() if tenant == tenant_id
        ]
        routes = [r for (tenant, *_), r in self.routes.items() if tenant == tenant_id]
        return TrafficStats(tenant_id=tenant_id, servers=servers, weights=split, routes=routes)

    def health(self, tenant_id: str) -> HealthStatus:
        """Healthy when the tenant's frontend has a ready backend."""
        ready = sum(
            1 for (tenant, _), b in self.backends.items()
            if tenant == tenant_id and b.state == "ready"
        )
        served = tenant_id in self.frontends
        return HealthStatus(healthy=served and ready > 0, detail=f"{ready} backends ready")
''',
    ),
    PluginType.TENANT_PROVISIONER: (
        "import datetime as dt\n\n"
        "from schemas.plugins import (\n    Ack,\n    HealthReport,\n    ProvisionRequest,\n"
        "    ProvisionResult,\n    TenantResources,\n    UsageSample,\n)",
        '''
    def provision(self, request: ProvisionRequest) -> ProvisionResult:
        """Record the tenant (idempotent)."""
        self.tenants[request.tenant_id] = request.plan.name
        return ProvisionResult(tenant_id=request.tenant_id, provisioner=self.name)

    def deprovision(self, tenant_id: str, platform: str | None = None) -> Ack:
        """Forget the tenant; an unknown one is fine."""
        self.tenants.pop(tenant_id, None)
        return Ack()

    def scale(self, request: ProvisionRequest) -> ProvisionResult:
        """Record the new plan."""
        return self.provision(request)

    def meter_usage(self, tenant_id: str, platform: str | None = None) -> UsageSample:
        """No usage to report."""
        return UsageSample(tenant_id=tenant_id, taken_at=dt.datetime.now(dt.UTC))

    def health_check(self, tenant_id: str, platform: str | None = None) -> HealthReport:
        """Healthy when provisioned."""
        return HealthReport(tenant_id=tenant_id, healthy=tenant_id in self.tenants)

    def get_resources(self, tenant_id: str, platform: str | None = None) -> TenantResources:
        """What the tenant holds."""
        return TenantResources(tenant_id=tenant_id, provisioner=self.name)
''',
    ),
    PluginType.PLATFORM: (
        "from typing import ClassVar\n\n"
        "from schemas.platform import (\n    ExecResult,\n    InstanceInfo,\n    InstanceSpec,\n"
        "    InstanceStats,\n    Limits,\n)",
        '''
    name: ClassVar[str] = "{name}"

    def _info(self, spec: InstanceSpec, status: str = "running") -> InstanceInfo:
        return InstanceInfo(
            name=spec.name, tenant_id=spec.tenant_id, platform=self.name, status=status,
            limits_requested=spec.limits, labels=spec.labels,
        )

    def create_instance(self, spec: InstanceSpec) -> InstanceInfo:
        """Record the instance; an existing one is returned."""
        self.instances.setdefault(spec.name, spec)
        return self._info(self.instances[spec.name])

    def destroy_instance(self, name: str) -> None:
        """Forget the instance; a missing one is fine."""
        self.instances.pop(name, None)

    def start_instance(self, name: str) -> InstanceInfo:
        """Instances here are always running."""
        return self._info(self.instances[name])

    def stop_instance(self, name: str) -> None:
        """Nothing to stop."""

    def exec(self, name: str, command: list[str], *, timeout: float = 30.0) -> ExecResult:
        """Echo the command."""
        return ExecResult(exit_code=0, stdout=" ".join(command), stderr="")

    def stats(self, name: str) -> InstanceStats:
        """No counters."""
        return InstanceStats(cpu_seconds=0.0, memory_bytes=0, disk_bytes=0)

    def set_limits(self, name: str, limits: Limits) -> InstanceInfo:
        """Record the new limits."""
        spec = self.instances[name].model_copy(update={{"limits": limits}})
        self.instances[name] = spec
        return self._info(spec)

    def list_instances(self, tenant_id: str | None = None) -> list[InstanceInfo]:
        """Every instance, or one tenant's."""
        return [
            self._info(s) for s in self.instances.values()
            if tenant_id is None or s.tenant_id == tenant_id
        ]
''',
    ),
}

_CONFIG: Final[dict[PluginType, str]] = {
    PluginType.OBSERVER: 'prefix: str = "seen: "',
    PluginType.STRATEGY: "max_error_rate: float = 0.05",
}


def _module(name: str, plugin_type: PluginType) -> str:
    imports, body = _BODIES[plugin_type]
    config_field = _CONFIG.get(plugin_type, "pass")
    # What the plugin imports from cul8er: the plugin API, and nothing else.
    api = "NotFoundError, PluginContext" if plugin_type is PluginType.SECRETS else "PluginContext"
    return (
        f'"""The {name} {plugin_type.value} plugin for cul8er."""\n\n'
        "from __future__ import annotations\n\n"
        "from typing import Any\n\n"
        "from pydantic import BaseModel, ConfigDict\n\n"
        f"{imports}\n"
        f"from workers.plugin_api import {api}\n\n"
        '__all__ = ["Config", "Plugin"]\n\n\n'
        "class Config(BaseModel):\n"
        f'    """The {name} plugin\'s settings (``CUL8ER_PLUGIN_CONFIG``)."""\n\n'
        '    model_config = ConfigDict(extra="forbid")\n\n'
        f"    {config_field}\n\n\n"
        "class Plugin:\n"
        f'    """The {plugin_type.value} contract, in memory."""\n\n'
        "    def __init__(self, config: Config | None, context: PluginContext) -> None:\n"
        "        self.config = config or Config()\n"
        "        self.name = context.name\n"
        "        self.log = context.log\n"
        "        self.seen: set[str] = set()\n"
        "        self.metrics: dict[str, float] = {}\n"
        "        self.store: dict[str, str] = {}\n"
        "        self.tenants: dict[str, str] = {}\n"
        "        self.backends: dict[Any, Any] = {}\n"
        "        self.weights: dict[str, dict[str, int]] = {}\n"
        "        self.routes: dict[Any, Any] = {}\n"
        "        self.frontends: dict[str, int] = {}\n"
        "        self.instances: dict[str, Any] = {}\n\n"
        "    def self_test(self) -> None:\n"
        '        """Run at load and on reload: raise to refuse this version."""\n'
        + body.replace("{name}", name).replace("{{", "{").replace("}}", "}")
    )


def _test(name: str, package: str, plugin_type: PluginType) -> str:
    return textwrap.dedent(
        f'''\
        """The {name} plugin loads through cul8er's checks and answers its contract."""

        from pathlib import Path

        from workers.pluginhost.contracts import operations
        from workers.pluginhost.discovery import read_candidate
        from workers.pluginhost.loader import build_instance, load_candidate, validate_config
        from workers.pluginhost.registry import PluginRegistry
        from workers.runtime.settings import Settings

        ROOT = Path(__file__).resolve().parent.parent / "{package}"


        def test_plugin_passes_every_check_and_answers(tmp_path):
            settings = Settings(data_dir=tmp_path)
            loaded = load_candidate(read_candidate(f"path:{{ROOT}}", ROOT), settings)
            plugin = build_instance(
                loaded, validate_config(loaded, {{}}), PluginRegistry(settings).context(loaded)
            )
            assert loaded.manifest.type.value == "{plugin_type.value}"
            for op in operations(loaded.manifest.type):
                assert callable(getattr(plugin, op))
        '''
    )


def write_manifest(
    root: Path, *, name: str, plugin_type: PluginType, module: str, trusted: bool
) -> Path:
    """(Re)write ``root``'s manifest with the sha256 of every file now in ``root``."""
    manifest: dict[str, object] = {
        "name": name,
        "version": "0.1.0",
        "type": plugin_type.value,
        "description": f"The {name} {plugin_type.value} plugin.",
        "module": module,
        "factory": "Plugin",
        "api": f">={API_VERSION.split('.')[0]},<{int(API_VERSION.split('.')[0]) + 1}",
        "config_model": f"{module}:Config",
        "permissions": [],
        "trusted": trusted,
        "files": file_digests(root),
    }
    path = root / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def plugin_name(typed: str) -> str:
    """The plugin name for what an author typed, normalised as packaging normalises project
    names: ``Acme-Observer`` and ``acme.observer`` become ``acme_observer``.

    Raises:
        ValidationFailedError: what is left still breaks :data:`NAME_RULE` (quoted whole).
    """
    name = re.sub(r"[-_.\s]+", "_", typed.strip().lower()).strip("_")
    if not re.fullmatch(NAME_RULE, name):
        message = (
            f"plugin name {typed!r} (as {name!r}) must match {NAME_RULE}: a letter, then "
            "letters, digits and '_' ('-', '.' and spaces count as '_'), at most 64"
        )
        raise ValidationFailedError(message, errors=[{"field": "name", "message": message}])
    return name


def write_plugin(
    directory: Path, *, name: str, plugin_type: PluginType, trusted: bool = False
) -> Path:
    """Write ``directory/cul8er-<name>/``: a pip-installable plugin package; returns it.

    ``name`` is normalised first (:func:`plugin_name`), so the module, the manifest and the
    entry point all use a name Python can import and the manifest accepts.
    """
    name = plugin_name(name)
    package = f"cul8er_{name}"
    project = directory / f"cul8er-{name.replace('_', '-')}"
    source = project / package
    source.mkdir(parents=True, exist_ok=False)
    (project / "tests").mkdir()
    (source / "__init__.py").write_text(_module(name, plugin_type))
    (project / "tests" / "test_plugin.py").write_text(_test(name, package, plugin_type))
    (project / "pyproject.toml").write_text(_pyproject(name, package, plugin_type))
    (project / "README.md").write_text(_readme(name, package, plugin_type, trusted=trusted))
    write_manifest(source, name=name, plugin_type=plugin_type, module=package, trusted=trusted)
    return project


def _pyproject(name: str, package: str, plugin_type: PluginType) -> str:
    """The plugin package's ``pyproject.toml``: the entry point cul8er discovers it by."""
    return textwrap.dedent(
        f"""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "cul8er-{name.replace("_", "-")}"
        version = "0.1.0"
        description = "The {name} {plugin_type.value} plugin for cul8er."
        requires-python = ">=3.11"

        # cul8er finds installed plugins through this entry-point group.
        [project.entry-points."cul8er.plugins"]
        {name} = "{package}"

        [tool.setuptools]
        packages = ["{package}"]

        [tool.setuptools.package-data]
        {package} = ["{MANIFEST_FILE}"]
        """
    )


def _readme(name: str, package: str, plugin_type: PluginType, *, trusted: bool) -> str:
    """The plugin package's README: how it runs, installs and is checked."""
    return textwrap.dedent(
        f"""\
        # cul8er-{name.replace("_", "-")}

        A cul8er {plugin_type.value} plugin. Its operations run as Celery tasks
        `plugins.{name}.<operation>` on queue `plugins.{name}`
        ({"a general worker" if trusted else "the sandbox worker: it is untrusted"}).

        ```sh
        pip install .                 # cul8er finds it through the cul8er.plugins entry point
        cul8er plugin validate {package}
        cul8er plugin list
        pytest tests                  # the plugin passes cul8er's checks
        ```

        After editing `{package}/`, refresh the file hashes in `{package}/{MANIFEST_FILE}`
        (cul8er refuses a plugin whose files changed): `cul8er plugin rehash {package}`.
        Config comes from `CUL8ER_PLUGIN_CONFIG='{{"{name}": {{...}}}}'`; values may be
        `${{secret:path}}` references, resolved when an operation runs.
        """
    )
