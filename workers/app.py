"""The composition root, ``workers.app:app``, for every ``celery -A workers.app worker|beat``.

The application itself lives in the runtime (:mod:`workers.runtime.app`). Here the rooms are
put together, once and explicitly: the plugin host hooks its worker signals and subscribes
its observer bus to the engine's events. Importing this module starts nothing.
"""

from __future__ import annotations

from workers.pluginhost.bootstrap import bootstrap
from workers.runtime.app import app

__all__ = ["app"]

bootstrap()
