"""The built-in tenant provisioners with real things: local instances, SQLite, PostgreSQL.

Instances are real processes of the ``local`` platform under a temporary data dir; the
PostgreSQL tests use a scratch database each (skipped locally, failed in CI, without it).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from plugins.builtin import BUILTIN_MANIFESTS
from plugins.platforms.local import LocalPlatform
from plugins.provisioners.container_per_tenant import ContainerPerTenant
from plugins.provisioners.database_per_tenant import (
    DatabasePerTenant,
    DatabasePerTenantConfig,
    database_name,
    schema_name,
)
from plugins.provisioners.shared_cluster import (
    SharedCluster,
    SharedClusterConfig,
    pool_instance_name,
)
from schemas.manifest import PluginType
from schemas.plans import Plan
from schemas.platform import Limits
from schemas.plugins import ProvisionRequest, ProvisionResult
from tests.conftest import require
from tests.stack import PG_ADMIN, create_pg_database, drop_pg_database, instance_processes
from workers.engine.instances import SHARED_TENANT_ID, instance_name, instance_spec, probe
from workers.plugin_api import PluginContext
from workers.pluginhost.contracts import check_contract
from workers.runtime.errors import ConfigError, ConflictError, NotFoundError, PermanentError
from workers.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
#: Never route loopback requests through an HTTP proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
#: ``get_platform`` caches platforms by ``id(settings)``: keeping every Settings alive for
#: the session stops a later test's Settings from reusing an id (and a stale platform).
_SETTINGS: list[Settings] = []

SMALL = Plan(name="small", cpu_cores=0.5, memory_gb=0.5, instances=2, max_instances=3)
BIG = Plan(name="big", cpu_cores=1, memory_gb=1, instances=1, max_instances=3)
#: No CPU quota at all: the largest limit of a pool holding it is unlimited.
BURST = Plan(name="burst", memory_gb=2, instances=1)

T = TypeVar("T")

#: A child process that builds a provisioner and provisions once both children are ready.
CHILD = textwrap.dedent(
    """
    import importlib, json, sys, time
    from pathlib import Path
    from schemas.plugins import ProvisionRequest
    from workers.plugin_api import PluginContext
    from workers.runtime.settings import Settings

    args = json.loads(sys.argv[1])
    module = importlib.import_module(args["module"])
    model = args["config_model"]
    config = getattr(module, model).model_validate(args["config"]) if model else None
    settings = Settings(data_dir=args["data_dir"], database_url=args["database_url"])
    context = PluginContext(args["name"], "1.0.0", Path(args["plugin_dir"]), settings)
    plugin = getattr(module, args["factory"])(config, context)
    request = ProvisionRequest.model_validate(args["request"])
    Path(args["ready"]).touch()
    while not Path(args["go"]).exists():
        time.sleep(0.005)
    Path(args["out"]).write_text(plugin.provision(request).model_dump_json())
    """
)


# -- helpers ----------------------------------------------------------------------------------


def new_tenant(prefix: str = "t") -> str:
    """A tenant id no other test (or test run) uses: cgroups and PG names are host-wide."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_settings(data_dir: Path, database_url: str | None = None) -> Settings:
    settings = Settings(data_dir=data_dir, database_url=database_url, instance_start_timeout=30)
    _SETTINGS.append(settings)
    return settings


def make_context(settings: Settings, name: str) -> PluginContext:
    return PluginContext(name, "1.0.0", settings.data_dir / "plugin-data" / name, settings)


def get(endpoint: str, path: str = "/health") -> int:
    """The HTTP status ``endpoint`` answers for ``path``."""
    try:
        with OPENER.open(f"http://{endpoint}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def concurrently(*calls: Callable[[], T]) -> list[T]:
    """Run each call in its own thread, all released at once; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(run, call) for call in calls]
        return [future.result(timeout=180) for future in futures]


def in_processes(
    plugin: str,
    settings: Settings,
    requests: list[ProvisionRequest],
    work: Path,
    config: dict[str, Any] | None = None,
) -> list[ProvisionResult]:
    """``provision`` each request in its own process, all released at the same moment."""
    manifest = next(m for m in BUILTIN_MANIFESTS if m.name == plugin)
    work.mkdir(parents=True, exist_ok=True)
    go = work / "go"
    children = []
    for n, request in enumerate(requests):
        args = {
            "module": manifest.module,
            "factory": manifest.factory,
            "config_model": (manifest.config_model or ":").split(":")[1] or None,
            "config": config or {},
            "data_dir": str(settings.data_dir),
            "database_url": settings.database_url,
            "name": plugin,
            "plugin_dir": str(settings.data_dir / "plugin-data" / plugin),
            "request": request.model_dump(mode="json"),
            "ready": str(work / f"ready-{n}"),
            "go": str(go),
            "out": str(work / f"out-{n}.json"),
        }
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, json.dumps(args)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    try:
        deadline = time.monotonic() + 60
        while not all((work / f"ready-{n}").exists() for n in range(len(requests))):
            assert all(child.poll() is None for child in children), "a child died while starting"
            assert time.monotonic() < deadline, "children did not get ready"
            time.sleep(0.01)
        go.touch()
        for child in children:
            _out, err = child.communicate(timeout=180)
            assert child.returncode == 0, err.decode(errors="replace")[-3000:]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return [
        ProvisionResult.model_validate_json((work / f"out-{n}.json").read_text())
        for n in range(len(requests))
    ]


def local(settings: Settings) -> LocalPlatform:
    """A second view of the local platform the provisioners use (same state dir)."""
    return LocalPlatform.from_settings(settings)


def pids(settings: Settings, name: str) -> list[int]:
    return [proc.pid for proc in instance_processes(settings.data_dir, name)]


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data dir whose local instances are destroyed after the test, even on failure."""
    path = tmp_path / "data"
    yield path
    platform = LocalPlatform(state_dir=path / "instances")
    for info in platform.list_instances():
        with contextlib.suppress(Exception):
            platform.destroy_instance(info.name)
    for process in instance_processes(path):
        with contextlib.suppress(Exception):
            process.kill()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A scratch PostgreSQL database for cul8er, dropped after the test."""
    require("postgres")
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture
def tenant_databases() -> Iterator[list[str]]:
    """Names of tenant databases to drop after the test, whatever it left behind."""
    names: list[str] = []
    yield names
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_databases() -> set[str]:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


# -- contracts and helpers ----------------------------------------------------------------------


def test_builtin_manifests_load_provisioners_that_fulfil_the_contract() -> None:
    # Given the built-in manifests of the tenant provisioners
    manifests = [m for m in BUILTIN_MANIFESTS if m.type is PluginType.TENANT_PROVISIONER]
    assert {m.name for m in manifests} == {
        "container_per_tenant",
        "database_per_tenant",
        "shared_cluster",
    }
    for manifest in manifests:
        # When their factory and config model are imported as the manifest names them
        module = importlib.import_module(manifest.module)
        factory = getattr(module, manifest.factory)
        if manifest.config_model:
            model_module, _, model = manifest.config_model.partition(":")
            getattr(importlib.import_module(model_module), model).model_validate({})
        # Then the class passes the contract check, under the manifest's name
        check_contract(manifest.name, PluginType.TENANT_PROVISIONER, factory)
        assert factory.name == manifest.name


def test_instance_helpers_keep_the_workflow_names(tmp_path: Path) -> None:
    # Given a plan with an image for the local platform
    plan = SMALL.model_copy(update={"images": {"local": "{python} -m x"}})
    # When the helpers name and describe instance 1
    spec = instance_spec("acme", plan, "local", 1, port=9000)
    # Then the name is deterministic and the spec carries the plan
    assert instance_name("acme", "app", 1) == spec.name == "t-acme-app-1"
    assert spec.image == "{python} -m x"
    assert spec.limits == Limits(cpu_cores=0.5, memory_mb=512)
    assert spec.labels == {"cul8er.tenant": "acme", "cul8er.plan": "small"}
    assert spec.port == 9000
    # And probes never leave loopback
    assert probe("10.0.0.1:80", timeout=0.1) == (False, "endpoint 10.0.0.1:80 is not on loopback")
    assert probe("example.com:80", timeout=0.1)[0] is False


# -- container_per_tenant -----------------------------------------------------------------------


def test_container_provision_answers_and_deprovision_removes_everything(data_dir: Path) -> None:
    # Given the provisioner on the local platform
    settings = make_settings(data_dir)
    provisioner = ContainerPerTenant(None, make_context(settings, "container_per_tenant"))
    tenant = new_tenant()

    # When a tenant on the small plan is provisioned
    result = provisioner.provision(ProvisionRequest(tenant_id=tenant, plan=SMALL))

    # Then it gets the plan's two instances, under the plan's limits, answering on loopback
    names = [f"t-{tenant}-app-0", f"t-{tenant}-app-1"]
    assert [info.name for info in result.instances] == names
    for info in result.instances:
        assert info.status == "running"
        assert info.endpoint is not None and info.endpoint.startswith("127.0.0.1:")
        assert get(info.endpoint) == 200
        assert info.limits_requested == Limits(cpu_cores=0.5, memory_mb=512)
    assert result.detail["created"] == names
    assert provisioner.health_check(tenant).healthy
    resources = provisioner.get_resources(tenant)
    assert [i["name"] for i in resources.instances] == names

    # When it is provisioned again
    again = provisioner.provision(ProvisionRequest(tenant_id=tenant, plan=SMALL))
    # Then the same instances are found, none created
    assert [i.provider_id for i in again.instances] == [i.provider_id for i in result.instances]
    assert again.detail["created"] == []

    # When it is deprovisioned, twice
    first = provisioner.deprovision(tenant)
    second = provisioner.deprovision(tenant)

    # Then no instance, folder or process is left, and the second is a no-op success
    assert first.ok and second.ok and second.detail == "nothing to destroy"
    assert local(settings).list_instances(tenant) == []
    assert all(pids(settings, name) == [] for name in names)
    assert not provisioner.health_check(tenant).healthy


def test_container_provision_twice_in_threads_makes_one_set(data_dir: Path) -> None:
    # Given two deliveries of the same provision request
    settings = make_settings(data_dir)
    provisioner = ContainerPerTenant(None, make_context(settings, "container_per_tenant"))
    tenant = new_tenant()
    request = ProvisionRequest(tenant_id=tenant, plan=SMALL)

    # When both run at the same moment in two threads
    first, second = concurrently(
        lambda: provisioner.provision(request), lambda: provisioner.provision(request)
    )

    # Then both answer the same instances, and each instance has one process
    assert [i.provider_id for i in first.instances] == [i.provider_id for i in second.instances]
    infos = local(settings).list_instances(tenant)
    assert [info.name for info in infos] == [f"t-{tenant}-app-0", f"t-{tenant}-app-1"]
    assert all(len(pids(settings, info.name)) == 1 for info in infos)


def test_container_provision_twice_in_processes_makes_one_set(
    data_dir: Path, tmp_path: Path
) -> None:
    # Given two deliveries of the same provision request
    settings = make_settings(data_dir)
    tenant = new_tenant()
    request = ProvisionRequest(tenant_id=tenant, plan=SMALL)

    # When two processes run them at the same moment
    first, second = in_processes(
        "container_per_tenant", settings, [request, request], tmp_path / "work"
    )

    # Then both answer the same instances, and each instance has one process that answers
    assert [i.provider_id for i in first.instances] == [i.provider_id for i in second.instances]
    infos = local(settings).list_instances(tenant)
    assert len(infos) == 2
    for info in infos:
        assert pids(settings, info.name) == [int(info.provider_id or 0)]
        assert info.endpoint is not None and get(info.endpoint) == 200


def test_container_scale_applies_limits_live_and_matches_the_count(data_dir: Path) -> None:
    # Given a tenant provisioned on the small plan (two instances)
    settings = make_settings(data_dir)
    provisioner = ContainerPerTenant(None, make_context(settings, "container_per_tenant"))
    tenant = new_tenant()
    before = provisioner.provision(ProvisionRequest(tenant_id=tenant, plan=SMALL))

    # When it scales to the big plan with three instances
    up = provisioner.scale(ProvisionRequest(tenant_id=tenant, plan=BIG, instances=3))

    # Then every instance runs under the new limits, the first two without a restart
    assert [i.name for i in up.instances] == [f"t-{tenant}-app-{n}" for n in range(3)]
    assert all(i.limits_requested == Limits(cpu_cores=1, memory_mb=1024) for i in up.instances)
    assert [i.provider_id for i in up.instances[:2]] == [i.provider_id for i in before.instances]
    assert up.detail["created"] == [f"t-{tenant}-app-2"]
    assert all(i.endpoint and get(i.endpoint) == 200 for i in up.instances)

    # When it scales down to the big plan's default count (one)
    down = provisioner.scale(ProvisionRequest(tenant_id=tenant, plan=BIG))

    # Then the highest instances are destroyed and named in the result
    assert [i.name for i in down.instances] == [f"t-{tenant}-app-0"]
    assert down.detail["destroyed"] == [f"t-{tenant}-app-2", f"t-{tenant}-app-1"]
    assert [i.name for i in local(settings).list_instances(tenant)] == [f"t-{tenant}-app-0"]
    assert pids(settings, f"t-{tenant}-app-1") == []

    # And more instances than the plan allows are refused for good
    with pytest.raises(PermanentError, match="max_instances"):
        provisioner.scale(ProvisionRequest(tenant_id=tenant, plan=BIG, instances=4))


def test_container_scale_right_after_provision_creates_nothing_again(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a tenant provisioned on the small plan (two running instances)
    settings = make_settings(data_dir)
    provisioner = ContainerPerTenant(None, make_context(settings, "container_per_tenant"))
    tenant = new_tenant()
    first = provisioner.provision(ProvisionRequest(tenant_id=tenant, plan=SMALL))
    asked: list[str] = []
    create = LocalPlatform.create_instance

    def counted(self: LocalPlatform, spec: Any) -> Any:
        asked.append(spec.name)
        return create(self, spec)

    monkeypatch.setattr(LocalPlatform, "create_instance", counted)

    # When it is scaled to the same plan, as the provision workflow's apply_limits does
    again = provisioner.scale(ProvisionRequest(tenant_id=tenant, plan=SMALL))

    # Then the platform is asked to create nothing: the listed running instances are the answer
    assert asked == []
    assert [i.provider_id for i in again.instances] == [i.provider_id for i in first.instances]
    assert again.detail["created"] == [] and again.detail["destroyed"] == []

    # When one instance is stopped and the tenant is provisioned again
    local(settings).stop_instance(f"t-{tenant}-app-1")
    restarted = provisioner.provision(ProvisionRequest(tenant_id=tenant, plan=SMALL))

    # Then only the stopped one goes through a create, which starts it again
    assert asked == [f"t-{tenant}-app-1"]
    assert all(i.endpoint and get(i.endpoint) == 200 for i in restarted.instances)


def test_container_meter_usage_sums_the_instances(data_dir: Path) -> None:
    # Given a tenant with two instances that served a request each
    settings = make_settings(data_dir)
    provisioner = ContainerPerTenant(None, make_context(settings, "container_per_tenant"))
    tenant = new_tenant()
    result = provisioner.provision(ProvisionRequest(tenant_id=tenant, plan=SMALL))
    for info in result.instances:
        assert get(info.endpoint or "", "/") in (200, 404)

    # When its usage is metered
    sample = provisioner.meter_usage(tenant)

    # Then the counters are the sum over both instances
    metrics = sample.metrics
    assert metrics["instances"] == 2
    for key in ("cpu_seconds", "memory_bytes", "disk_bytes", "rx_bytes", "tx_bytes"):
        assert metrics[key] > 0, key
    platform = local(settings)
    memory = sum(platform.stats(i.name).memory_bytes for i in result.instances)
    assert metrics["memory_bytes"] == pytest.approx(memory, rel=0.5)


def test_container_uses_the_platform_it_is_told(data_dir: Path) -> None:
    # Given a tenant provisioned on "local", and a default platform that does not exist
    settings = make_settings(data_dir).model_copy(update={"default_platform": "nowhere"})
    _SETTINGS.append(settings)
    tenant = new_tenant()
    provisioner = ContainerPerTenant(None, make_context(settings, "container_per_tenant"))
    provisioner.provision(ProvisionRequest(tenant_id=tenant, plan=BIG, platform="local"))

    # When its usage, health and resources are read with the platform cul8er recorded
    assert provisioner.meter_usage(tenant, platform="local").metrics["instances"] == 1
    assert provisioner.get_resources(tenant, platform="local").detail == {"platform": "local"}
    # Then without it, the (unknown) default platform is used: the provisioner reads no table
    with pytest.raises(ConfigError, match="nowhere"):
        provisioner.deprovision(tenant)

    # And deprovisioning with the platform removes its instances on "local"
    provisioner.deprovision(tenant, platform="local")
    assert local(settings).list_instances(tenant) == []


def test_container_refuses_bad_ids_and_names_it_does_not_own(data_dir: Path) -> None:
    # Given the container and shared provisioners on one data dir
    settings = make_settings(data_dir)
    provisioner = ContainerPerTenant(None, make_context(settings, "container_per_tenant"))
    shared = SharedCluster(SharedClusterConfig(size=1), make_context(settings, "shared_cluster"))

    # When a tenant id is not a slug, it is refused before any name is derived from it
    for bad in ("Acme", "a", "x; drop", "../etc", "trailing-"):
        with pytest.raises(PermanentError, match="invalid tenant id"):
            provisioner.provision(ProvisionRequest(tenant_id=bad, plan=BIG))

    # When the shared pool exists and a tenant called "shared-local" asks for instances
    shared.provision(ProvisionRequest(tenant_id=new_tenant(), plan=BIG))
    # Then the pool's instance is never adopted as the tenant's
    with pytest.raises(ConflictError, match="_shared"):
        provisioner.provision(ProvisionRequest(tenant_id="shared-local", plan=BIG))
    assert provisioner.deprovision("shared-local").detail == "nothing to destroy"
    assert [i.name for i in local(settings).list_instances()] == ["t-shared-local-app-0"]


# -- database_per_tenant ------------------------------------------------------------------------


def test_database_sqlite_file_lifecycle(data_dir: Path) -> None:
    # Given the embedded stack (SQLite), where the mode does not matter
    settings = make_settings(data_dir)
    config = DatabasePerTenantConfig(mode="database")
    provisioner = DatabasePerTenant(config, make_context(settings, "database_per_tenant"))
    tenant = new_tenant()
    request = ProvisionRequest(tenant_id=tenant, plan=SMALL)

    # When the store is provisioned twice at the same moment
    first, second = concurrently(
        lambda: provisioner.provision(request), lambda: provisioner.provision(request)
    )

    # Then both name one file, holding the tenant's row once
    path = data_dir / "tenants" / tenant / "data.db"
    assert first.datastore == second.datastore == {"kind": "sqlite", "path": str(path)}
    assert first.instances == []
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as lite:
        assert lite.execute("SELECT tenant_id FROM tenant_info").fetchall() == [(tenant,)]
    assert provisioner.meter_usage(tenant).metrics["storage_bytes"] == path.stat().st_size > 0
    assert provisioner.health_check(tenant).healthy
    assert provisioner.scale(request).datastore == first.datastore
    assert provisioner.get_resources(tenant).datastore == first.datastore

    # When it is deprovisioned, twice
    assert provisioner.deprovision(tenant).detail == "dropped sqlite store"
    assert provisioner.deprovision(tenant).detail == "nothing to drop"

    # Then the file is gone, and checks report it without creating it again
    assert not path.parent.exists()
    assert not provisioner.health_check(tenant).healthy
    assert not path.exists()
    with pytest.raises(NotFoundError):
        provisioner.meter_usage(tenant)
    with pytest.raises(NotFoundError):
        provisioner.scale(request)
    assert provisioner.get_resources(tenant).datastore == {}


@pytest.mark.postgres
def test_database_postgres_schema_lifecycle(data_dir: Path, pg_url: str) -> None:
    # Given cul8er on a scratch PostgreSQL database, in schema mode
    settings = make_settings(data_dir, pg_url)
    provisioner = DatabasePerTenant(None, make_context(settings, "database_per_tenant"))
    tenant = new_tenant()
    request = ProvisionRequest(tenant_id=tenant, plan=SMALL)
    schema = schema_name(tenant)

    # When the store is provisioned four times at the same moment
    results = concurrently(*[lambda: provisioner.provision(request)] * 4)

    # Then there is one schema, holding the tenant's row once
    assert {json.dumps(r.datastore) for r in results} == {
        json.dumps({"kind": "postgresql-schema", "schema": schema})
    }
    engine = create_engine(pg_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(f'SELECT tenant_id FROM "{schema}".tenant_info')).all()
            assert [tuple(row) for row in rows] == [(tenant,)]
        assert provisioner.meter_usage(tenant).metrics["storage_bytes"] > 0
        assert provisioner.health_check(tenant).healthy
        assert provisioner.scale(request).datastore == results[0].datastore

        # When it is deprovisioned twice at the same moment, then once more
        concurrently(
            lambda: provisioner.deprovision(tenant), lambda: provisioner.deprovision(tenant)
        )
        assert provisioner.deprovision(tenant).detail == "nothing to drop"

        # Then the schema is gone
        with engine.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM information_schema.schemata WHERE schema_name = :s"),
                {"s": schema},
            ).first()
        assert found is None
        assert not provisioner.health_check(tenant).healthy
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("how", ["threads", "processes"])
def test_database_postgres_database_lifecycle(
    data_dir: Path, tmp_path: Path, pg_url: str, tenant_databases: list[str], how: str
) -> None:
    # Given cul8er on a scratch PostgreSQL database, in database mode
    settings = make_settings(data_dir, pg_url)
    config = DatabasePerTenantConfig(mode="database")
    provisioner = DatabasePerTenant(config, make_context(settings, "database_per_tenant"))
    tenant = new_tenant()
    name = database_name(tenant)
    tenant_databases.append(name)
    request = ProvisionRequest(tenant_id=tenant, plan=SMALL)

    # When two deliveries create the store at the same moment
    if how == "threads":
        results = concurrently(
            lambda: provisioner.provision(request), lambda: provisioner.provision(request)
        )
    else:
        results = in_processes(
            "database_per_tenant",
            settings,
            [request, request],
            tmp_path / "work",
            config={"mode": "database"},
        )

    # Then one real database exists, holding the tenant's row once
    assert [r.datastore for r in results] == [{"kind": "postgresql-database", "database": name}] * 2
    assert name in pg_databases()
    tenant_url = pg_url.rsplit("/", 1)[0] + "/" + name
    engine = create_engine(tenant_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT tenant_id FROM tenant_info")).all()
        assert [tuple(row) for row in rows] == [(tenant,)]
    finally:
        engine.dispose()
    assert provisioner.meter_usage(tenant).metrics["storage_bytes"] > 1_000_000
    assert provisioner.health_check(tenant).healthy
    assert provisioner.scale(request).datastore == results[0].datastore

    # When it is deprovisioned while a session is open on it, then again
    held = psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}")
    try:
        assert provisioner.deprovision(tenant).detail == "dropped postgresql-database store"
    finally:
        with contextlib.suppress(psycopg.Error):
            held.close()
    assert provisioner.deprovision(tenant).detail == "nothing to drop"

    # Then the database is gone from pg_database
    assert name not in pg_databases()
    assert not provisioner.health_check(tenant).healthy
    with pytest.raises(NotFoundError):
        provisioner.meter_usage(tenant)


# -- shared_cluster -----------------------------------------------------------------------------


def test_shared_cluster_two_tenants_share_one_pool(data_dir: Path) -> None:
    # Given the shared provisioner with pools of two instances
    settings = make_settings(data_dir)
    provisioner = SharedCluster(
        SharedClusterConfig(size=2), make_context(settings, "shared_cluster")
    )
    first, second = new_tenant("a"), new_tenant("b")
    pool = [pool_instance_name("local", 0), pool_instance_name("local", 1)]
    assert pool == ["t-shared-local-app-0", "t-shared-local-app-1"]

    # When the first tenant joins on the small plan
    one = provisioner.provision(ProvisionRequest(tenant_id=first, plan=SMALL))

    # Then the pool exists under the small plan's limits; the tenant owns no instance
    assert one.instances == []
    assert one.detail["cluster"] == pool and len(one.detail["endpoints"]) == 2
    assert all(get(endpoint) == 200 for endpoint in one.detail["endpoints"])
    infos = local(settings).list_instances(SHARED_TENANT_ID)
    assert [i.name for i in infos] == pool
    assert all(i.limits_requested == Limits(cpu_cores=0.5, memory_mb=512) for i in infos)
    assert local(settings).list_instances(first) == []

    # When the second tenant joins on the big plan
    two = provisioner.provision(ProvisionRequest(tenant_id=second, plan=BIG))

    # Then it shares the same instances (same processes), raised to the big plan's limits
    assert two.detail["endpoints"] == one.detail["endpoints"]
    raised = local(settings).list_instances(SHARED_TENANT_ID)
    assert [i.provider_id for i in raised] == [i.provider_id for i in infos]
    assert all(i.limits_requested == Limits(cpu_cores=1, memory_mb=1024) for i in raised)
    assert provisioner.health_check(first).healthy and provisioner.health_check(second).healthy
    sample = provisioner.meter_usage(first)
    assert sample.metrics["share"] == 0.5
    assert sample.metrics["memory_bytes"] > 0 and sample.metrics["cpu_seconds"] > 0
    assert provisioner.get_resources(second).detail["cluster"] == pool

    # When the first tenant scales to a plan without a CPU quota
    provisioner.scale(ProvisionRequest(tenant_id=first, plan=BURST))

    # Then the pool's CPU becomes unlimited and its memory rises to 2 GB
    burst = local(settings).list_instances(SHARED_TENANT_ID)
    assert all(i.limits_requested == Limits(memory_mb=2048) for i in burst)

    # When the first tenant leaves, the pool stays for the second
    assert provisioner.deprovision(first).ok
    assert [i.name for i in local(settings).list_instances(SHARED_TENANT_ID)] == pool
    assert provisioner.meter_usage(second).metrics["share"] == 1.0
    with pytest.raises(NotFoundError):
        provisioner.meter_usage(first)

    # When the second leaves too, twice
    assert provisioner.deprovision(second).ok
    assert provisioner.deprovision(second).detail == "not a member"

    # Then the pool is destroyed, processes and all
    assert local(settings).list_instances() == []
    assert all(pids(settings, name) == [] for name in pool)
    assert not provisioner.health_check(second).healthy
    members = json.loads((data_dir / "plugin-data" / "shared_cluster" / "members.json").read_text())
    assert members == {}


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_shared_cluster_concurrent_joins_make_one_pool(
    data_dir: Path, tmp_path: Path, how: str
) -> None:
    # Given two tenants joining the shared pool at the same moment
    settings = make_settings(data_dir)
    config = SharedClusterConfig(size=2)
    provisioner = SharedCluster(config, make_context(settings, "shared_cluster"))
    first, second = new_tenant("a"), new_tenant("b")
    requests = [
        ProvisionRequest(tenant_id=first, plan=SMALL),
        ProvisionRequest(tenant_id=second, plan=BIG),
    ]

    # When both provision concurrently
    if how == "threads":
        results = concurrently(*[lambda r=r: provisioner.provision(r) for r in requests])
    else:
        results = in_processes(
            "shared_cluster", settings, requests, tmp_path / "work", config={"size": 2}
        )

    # Then there is one pool of two instances, one process each, under the big limits
    infos = local(settings).list_instances()
    assert [i.name for i in infos] == ["t-shared-local-app-0", "t-shared-local-app-1"]
    assert all(len(pids(settings, i.name)) == 1 for i in infos)
    assert all(i.limits_requested == Limits(cpu_cores=1, memory_mb=1024) for i in infos)
    assert results[0].detail["cluster"] == results[1].detail["cluster"]
    # And both memberships were recorded
    assert provisioner.meter_usage(first).metrics["share"] == 0.5
    assert provisioner.meter_usage(second).metrics["share"] == 0.5

    # When both leave concurrently
    concurrently(lambda: provisioner.deprovision(first), lambda: provisioner.deprovision(second))

    # Then the pool is gone
    assert local(settings).list_instances() == []
