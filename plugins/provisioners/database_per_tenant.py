"""The ``database_per_tenant`` provisioner: each tenant's own data store.

On PostgreSQL a tenant gets a schema ``tenant_<id>`` in cul8er's database (``mode="schema"``)
or a database ``cul8er_t_<id>`` of its own (``mode="database"``); on the embedded SQLite
stack it gets a file ``<data_dir>/tenants/<id>/data.db`` whatever the mode. Every name is
derived from the validated tenant slug, never from user text.

Creates are idempotent and safe from two processes at once: PostgreSQL's ``IF NOT EXISTS``
forms still race on the catalog's unique indexes, so each create runs under an advisory
lock named after the tenant, and a ``duplicate_database`` error means another creator won.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final, Literal

import structlog
from pydantic import BaseModel, ConfigDict
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from schemas.plugins import Ack, HealthReport, ProvisionResult, TenantResources, UsageSample
from workers.plugin_api import NotFoundError, TransientError, check_tenant_id, get_engine

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Connection

    from schemas.plugins import ProvisionRequest
    from workers.plugin_api import PluginContext, Settings

__all__ = [
    "DatabasePerTenant",
    "DatabasePerTenantConfig",
    "database_name",
    "schema_name",
    "sqlite_path",
    "store_exists",
]

log = structlog.get_logger(__name__)

#: SQLSTATE of ``CREATE DATABASE`` for a name that exists.
DUPLICATE_DATABASE: Final = "42P04"
#: Seconds a health check waits for a connection to the tenant's store.
CONNECT_TIMEOUT: Final = 5
#: The table every tenant store holds, naming its tenant (a marker, and proof it is usable).
INFO_TABLE_PG: Final = (
    "CREATE TABLE IF NOT EXISTS {table} "
    "(tenant_id text primary key, created_at timestamptz default now())"
)
INFO_ROW_PG: Final = "INSERT INTO {table} (tenant_id) VALUES (:t) ON CONFLICT DO NOTHING"


class DatabasePerTenantConfig(BaseModel):
    """Config of the ``database_per_tenant`` provisioner."""

    model_config = ConfigDict(extra="forbid")

    #: On PostgreSQL: a schema in cul8er's database, or a database of the tenant's own.
    mode: Literal["schema", "database"] = "schema"


def schema_name(tenant_id: str) -> str:
    """The tenant's schema in cul8er's database."""
    return "tenant_" + check_tenant_id(tenant_id).replace("-", "_")


def database_name(tenant_id: str) -> str:
    """The tenant's own PostgreSQL database."""
    return "cul8er_t_" + check_tenant_id(tenant_id).replace("-", "_")


def sqlite_path(settings: Settings, tenant_id: str) -> Path:
    """The tenant's SQLite file on the embedded stack."""
    return settings.data_dir / "tenants" / check_tenant_id(tenant_id) / "data.db"


def _lock_key(kind: str, name: str) -> str:
    # hashtext() of this string is the advisory lock; the prefix keeps it clear of others'.
    return f"cul8er.database_per_tenant:{kind}:{name}"


@contextlib.contextmanager
def _transient() -> Iterator[None]:
    """A lost or refused connection is worth a retry; anything else is not."""
    try:
        yield
    except OperationalError as exc:
        raise TransientError(f"database unavailable: {exc.orig!s}") from exc


class DatabasePerTenant:
    """A PostgreSQL schema or database per tenant; a SQLite file on the embedded stack."""

    name: ClassVar[str] = "database_per_tenant"

    def __init__(self, config: DatabasePerTenantConfig | None, context: PluginContext) -> None:
        self.config = config or DatabasePerTenantConfig()
        self.context = context
        self.settings = context.settings

    @property
    def kind(self) -> Literal["postgresql-schema", "postgresql-database", "sqlite"]:
        """What a tenant's store is under these settings."""
        if not self.settings.sqlalchemy_url.startswith("postgresql"):
            return "sqlite"
        return "postgresql-database" if self.config.mode == "database" else "postgresql-schema"

    # -- the TenantProvisioner contract -----------------------------------------------------

    def provision(self, request: ProvisionRequest) -> ProvisionResult:
        """Create the tenant's store if it is missing; the result says where it is."""
        tenant_id = check_tenant_id(request.tenant_id)
        kind = self.kind
        if kind == "postgresql-schema":
            self._create_schema(tenant_id)
        elif kind == "postgresql-database":
            self._create_database(tenant_id)
        else:
            self._create_sqlite(tenant_id)
        log.info("tenant_datastore_provisioned", tenant_id=tenant_id, kind=kind)
        return self._result(tenant_id)

    def deprovision(self, tenant_id: str) -> Ack:
        """Drop the tenant's store and everything in it; a missing store is success."""
        check_tenant_id(tenant_id)
        kind = self.kind
        existed = self._exists(tenant_id)
        if kind == "postgresql-schema":
            schema = schema_name(tenant_id)
            with _transient(), get_engine(self.settings.sqlalchemy_url).begin() as conn:
                self._xact_lock(conn, "schema", schema)
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        elif kind == "postgresql-database":
            name = database_name(tenant_id)
            with self._admin() as conn, self._locked(conn, "database", name):
                # FORCE ends the tenant's open sessions, which would otherwise block the drop.
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        else:
            shutil.rmtree(sqlite_path(self.settings, tenant_id).parent, ignore_errors=True)
        log.info("tenant_datastore_deprovisioned", tenant_id=tenant_id, kind=kind, existed=existed)
        return Ack(detail=f"dropped {kind} store" if existed else "nothing to drop")

    def scale(self, request: ProvisionRequest) -> ProvisionResult:
        """A plan change leaves the store as it is: the current result (missing: not found)."""
        tenant_id = check_tenant_id(request.tenant_id)
        if not self._exists(tenant_id):
            raise NotFoundError(f"tenant {tenant_id!r} has no {self.kind} store")
        return self._result(tenant_id)

    def meter_usage(self, tenant_id: str) -> UsageSample:
        """``storage_bytes``: the database's, the schema's relations' or the file's size."""
        check_tenant_id(tenant_id)
        if not self._exists(tenant_id):
            raise NotFoundError(f"tenant {tenant_id!r} has no {self.kind} store")
        kind = self.kind
        if kind == "sqlite":
            size = self._sqlite_size(tenant_id)
        else:
            if kind == "postgresql-database":
                query = "SELECT pg_database_size(:name)"
                name = database_name(tenant_id)
            else:
                # Tables and materialised views with their indexes and TOAST, in this schema.
                query = (
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = :name AND c.relkind IN ('r', 'm')"
                )
                name = schema_name(tenant_id)
            with _transient(), get_engine(self.settings.sqlalchemy_url).connect() as conn:
                size = int(conn.execute(text(query), {"name": name}).scalar_one())
        return UsageSample(
            tenant_id=tenant_id,
            taken_at=dt.datetime.now(dt.UTC),
            metrics={"storage_bytes": float(size)},
        )

    def health_check(self, tenant_id: str) -> HealthReport:
        """Connect to the tenant's store and run ``SELECT 1``."""
        check_tenant_id(tenant_id)
        kind = self.kind
        try:
            if kind == "postgresql-database":
                engine = create_engine(self._tenant_url(tenant_id), poolclass=NullPool)
                try:
                    with engine.connect() as conn:
                        conn.execute(text("SELECT 1")).scalar_one()
                finally:
                    engine.dispose()
            elif kind == "postgresql-schema":
                with get_engine(self.settings.sqlalchemy_url).connect() as conn:
                    found = conn.execute(
                        text("SELECT 1 FROM pg_namespace WHERE nspname = :s"),
                        {"s": schema_name(tenant_id)},
                    ).first()
                if found is None:
                    raise LookupError(f"schema {schema_name(tenant_id)} does not exist")
            else:
                path = sqlite_path(self.settings, tenant_id)
                # mode=rw: a check must never create the file it is checking.
                lite = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=CONNECT_TIMEOUT)
                try:
                    lite.execute("SELECT 1").fetchone()
                finally:
                    lite.close()
        except (DBAPIError, sqlite3.Error, LookupError) as exc:
            detail = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
            return HealthReport(
                tenant_id=tenant_id, healthy=False, checks={"datastore": f"unhealthy: {detail}"}
            )
        return HealthReport(tenant_id=tenant_id, healthy=True, checks={"datastore": "healthy"})

    def get_resources(self, tenant_id: str) -> TenantResources:
        """Where the tenant's store is, if it exists."""
        check_tenant_id(tenant_id)
        exists = self._exists(tenant_id)
        return TenantResources(
            tenant_id=tenant_id,
            provisioner=self.name,
            datastore=self._location(tenant_id) if exists else {},
            detail={"exists": exists, "kind": self.kind},
        )

    # -- PostgreSQL -------------------------------------------------------------------------

    def _create_schema(self, tenant_id: str) -> None:
        schema = schema_name(tenant_id)
        table = f'"{schema}".tenant_info'
        with _transient(), get_engine(self.settings.sqlalchemy_url).begin() as conn:
            # Two concurrent creates would otherwise collide in pg_namespace's unique index.
            self._xact_lock(conn, "schema", schema)
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            conn.execute(text(INFO_TABLE_PG.format(table=table)))
            conn.execute(text(INFO_ROW_PG.format(table=table)), {"t": tenant_id})

    def _create_database(self, tenant_id: str) -> None:
        name = database_name(tenant_id)
        with self._admin() as conn, self._locked(conn, "database", name):
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).first()
            if exists is None:
                try:
                    conn.execute(text(f'CREATE DATABASE "{name}"'))
                    log.info("tenant_database_created", tenant_id=tenant_id, database=name)
                except DBAPIError as exc:
                    # A creator that does not take our lock got there first: it exists.
                    if getattr(exc.orig, "sqlstate", None) != DUPLICATE_DATABASE:
                        raise
            # Still under the lock: a concurrent create waits rather than racing this table.
            engine = create_engine(self._tenant_url(tenant_id), poolclass=NullPool)
            try:
                with _transient(), engine.begin() as tenant_conn:
                    tenant_conn.execute(text(INFO_TABLE_PG.format(table="tenant_info")))
                    tenant_conn.execute(
                        text(INFO_ROW_PG.format(table="tenant_info")), {"t": tenant_id}
                    )
            finally:
                engine.dispose()

    @contextlib.contextmanager
    def _admin(self) -> Iterator[Connection]:
        """An autocommit connection to cul8er's database: CREATE DATABASE refuses transactions."""
        engine = get_engine(self.settings.sqlalchemy_url)
        with _transient(), engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    @staticmethod
    def _xact_lock(conn: Connection, kind: str, name: str) -> None:
        """Take an advisory lock that the transaction's end releases."""
        conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": _lock_key(kind, name)}
        )

    @staticmethod
    @contextlib.contextmanager
    def _locked(conn: Connection, kind: str, name: str) -> Iterator[None]:
        """Hold a session advisory lock on ``conn`` (dropped with the connection if it dies)."""
        key = {"k": _lock_key(kind, name)}
        conn.execute(text("SELECT pg_advisory_lock(hashtext(:k))"), key)
        try:
            yield
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), key)
            except DBAPIError:
                # Never pool a connection that may still hold the lock: closing it drops it.
                conn.invalidate()

    def _tenant_url(self, tenant_id: str) -> str:
        url = make_url(self.settings.sqlalchemy_url).set(database=database_name(tenant_id))
        query = {**url.query, "connect_timeout": str(CONNECT_TIMEOUT)}
        return url.set(query=query).render_as_string(hide_password=False)

    # -- SQLite -----------------------------------------------------------------------------

    def _create_sqlite(self, tenant_id: str) -> None:
        path = sqlite_path(self.settings, tenant_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        # SQLite serialises concurrent writers itself; IF NOT EXISTS and OR IGNORE do the rest.
        lite = sqlite3.connect(path, timeout=30)
        try:
            with lite:
                lite.execute("CREATE TABLE IF NOT EXISTS tenant_info (tenant_id TEXT PRIMARY KEY)")
                lite.execute("INSERT OR IGNORE INTO tenant_info VALUES (?)", (tenant_id,))
        except sqlite3.OperationalError as exc:
            raise TransientError(f"cannot create {path}: {exc}") from exc
        finally:
            lite.close()

    def _sqlite_size(self, tenant_id: str) -> int:
        path = sqlite_path(self.settings, tenant_id)
        total = 0
        # The write-ahead log holds data not yet checkpointed into the main file.
        for suffix in ("", "-wal", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{path}{suffix}").st_size
        return total

    # -- both -------------------------------------------------------------------------------

    def exists(self, tenant_id: str) -> bool:
        """Whether the tenant's store exists."""
        return self._exists(check_tenant_id(tenant_id))

    def _exists(self, tenant_id: str) -> bool:
        kind = self.kind
        if kind == "sqlite":
            return sqlite_path(self.settings, tenant_id).is_file()
        if kind == "postgresql-database":
            query, name = "SELECT 1 FROM pg_database WHERE datname = :n", database_name(tenant_id)
        else:
            query, name = "SELECT 1 FROM pg_namespace WHERE nspname = :n", schema_name(tenant_id)
        with _transient(), get_engine(self.settings.sqlalchemy_url).connect() as conn:
            return conn.execute(text(query), {"n": name}).first() is not None

    def _location(self, tenant_id: str) -> dict[str, str]:
        kind = self.kind
        if kind == "postgresql-database":
            return {"kind": kind, "database": database_name(tenant_id)}
        if kind == "postgresql-schema":
            return {"kind": kind, "schema": schema_name(tenant_id)}
        return {"kind": kind, "path": str(sqlite_path(self.settings, tenant_id))}

    def _result(self, tenant_id: str) -> ProvisionResult:
        return ProvisionResult(
            tenant_id=tenant_id,
            provisioner=self.name,
            datastore=self._location(tenant_id),
            detail={"mode": self.config.mode if self.kind != "sqlite" else "file"},
        )


def store_exists(settings: Settings, tenant_id: str, *, mode: str = "schema") -> bool:
    """Whether ``tenant_id``'s store exists under ``settings`` (for operators and tests)."""
    from workers.plugin_api import PluginContext

    context = PluginContext(
        name="database_per_tenant",
        version="1.0.0",
        data_dir=settings.data_dir / "plugin-data" / "database_per_tenant",
        settings=settings,
    )
    config = DatabasePerTenantConfig.model_validate({"mode": mode})
    return DatabasePerTenant(config, context).exists(tenant_id)
