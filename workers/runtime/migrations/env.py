"""Alembic environment: the URL comes from cul8er's settings unless the caller set one."""

from __future__ import annotations

from alembic import context

from workers.runtime.db import get_engine
from workers.runtime.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
if not url:
    from workers.runtime.settings import get_settings

    url = get_settings().sqlalchemy_url

connectable = get_engine(url)
with connectable.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
