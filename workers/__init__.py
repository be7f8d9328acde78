"""cul8er's runtime: Celery app, settings, database, ledger, registry and CLI."""
