"""The Celery application (named ``workers.app:app`` for ``celery -A``): config, broker, signals."""

from __future__ import annotations

from typing import Any

from celery import Celery

from workers.runtime import signals as _signals  # noqa: F401  (connects the handlers)
from workers.runtime.config import celery_config
from workers.runtime.embedded import EmbeddedRedis
from workers.runtime.settings import get_settings

__all__ = ["app"]

app = Celery("cul8er")
app.config_from_object(celery_config(get_settings()))


@app.on_configure.connect
def _start_embedded_broker(**_kwargs: Any) -> None:
    # Lazy: only a process that really talks to the broker starts (or reuses) the embedded one.
    settings = get_settings()
    if settings.embedded_broker:
        EmbeddedRedis(settings.data_dir).ensure_running()
