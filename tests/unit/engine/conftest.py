"""Fixtures of the engine's unit tests: each test on SQLite and on PostgreSQL, a private broker."""

from tests.unit.engine.harness import broker, configure

__all__ = ["broker", "configure"]
