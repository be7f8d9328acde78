"""Built-in tenant provisioners: how a tenant's instances and data store are laid out.

``container_per_tenant`` gives each tenant instances of its own, ``shared_cluster`` places
tenants on one pool per platform, and ``database_per_tenant`` gives each tenant its own
PostgreSQL schema or database (a SQLite file on the embedded stack).
"""

from __future__ import annotations

__all__: list[str] = []
