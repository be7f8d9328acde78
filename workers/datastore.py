"""Each tenant's own data store: a SQLite file on the embedded default, a schema on PostgreSQL."""

from __future__ import annotations

import shutil
import sqlite3
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from workers.db import get_engine

if TYPE_CHECKING:
    from workers.settings import Settings

__all__ = ["create_store", "drop_store", "store_exists"]


def _schema(tenant_id: str) -> str:
    # Tenant ids are validated slugs ([a-z0-9-]); the schema name is derived, never user text.
    return "tenant_" + tenant_id.replace("-", "_")


def _sqlite_path(settings: Settings, tenant_id: str) -> Any:
    return settings.data_dir / "tenants" / tenant_id / "data.db"


def _is_postgres(settings: Settings) -> bool:
    return settings.sqlalchemy_url.startswith("postgresql")


def create_store(settings: Settings, tenant_id: str) -> dict[str, str]:
    """Create the tenant's store if it is missing; returns where it is."""
    if _is_postgres(settings):
        schema = _schema(tenant_id)
        with get_engine(settings.sqlalchemy_url).begin() as conn:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            conn.execute(
                text(
                    f'CREATE TABLE IF NOT EXISTS "{schema}".tenant_info '
                    "(tenant_id text primary key, created_at timestamptz default now())"
                )
            )
            conn.execute(
                text(
                    f'INSERT INTO "{schema}".tenant_info (tenant_id) VALUES (:t) '
                    "ON CONFLICT DO NOTHING"
                ),
                {"t": tenant_id},
            )
        return {"kind": "postgresql-schema", "schema": schema}
    path = _sqlite_path(settings, tenant_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    lite = sqlite3.connect(path)
    try:
        with lite:
            lite.execute("CREATE TABLE IF NOT EXISTS tenant_info (tenant_id TEXT PRIMARY KEY)")
            lite.execute("INSERT OR IGNORE INTO tenant_info VALUES (?)", (tenant_id,))
    finally:
        lite.close()
    return {"kind": "sqlite", "path": str(path)}


def drop_store(settings: Settings, tenant_id: str) -> None:
    """Remove the tenant's store and everything in it; a missing store is fine."""
    if _is_postgres(settings):
        with get_engine(settings.sqlalchemy_url).begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{_schema(tenant_id)}" CASCADE'))
        return
    shutil.rmtree(_sqlite_path(settings, tenant_id).parent, ignore_errors=True)


def store_exists(settings: Settings, tenant_id: str) -> bool:
    """Whether the tenant's store exists."""
    if _is_postgres(settings):
        with get_engine(settings.sqlalchemy_url).connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM information_schema.schemata WHERE schema_name = :s"),
                {"s": _schema(tenant_id)},
            ).first()
        return found is not None
    return bool(_sqlite_path(settings, tenant_id).exists())
