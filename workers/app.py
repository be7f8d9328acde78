"""The entry point ``workers.app:app`` for every ``celery -A workers.app worker|beat|flower``.

The application itself lives in the runtime (:mod:`workers.runtime.app`); this module only
names it where Celery, compose files and the README look for it.
"""

from __future__ import annotations

from workers.runtime.app import app

__all__ = ["app"]
