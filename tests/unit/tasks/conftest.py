"""Fixtures of the task modules' unit tests: SQLite and PostgreSQL, a private broker."""

from tests.unit.engine.harness import broker, configure

__all__ = ["broker", "configure"]
