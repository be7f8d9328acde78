"""The Celery application (named ``workers.app:app`` for ``celery -A``): config, broker, signals.

Importing it starts nothing: on the embedded default the broker belongs to ``cul8er up``
(:mod:`workers.runtime.embedded`), and every process built on this app is its client.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task, signals

from workers.runtime import signals as _signals  # noqa: F401  (connects the handlers)
from workers.runtime.config import celery_config
from workers.runtime.embedded import EmbeddedRedis
from workers.runtime.errors import ConfigError
from workers.runtime.settings import get_settings
from workers.runtime.task import Cul8erTask

__all__ = ["app"]

# Every task is a Cul8erTask unless it names a subclass (workers.runtime.task says which).
app: Celery[Task[Any, Any]] = Celery("cul8er", task_cls=Cul8erTask)
app.config_from_object(celery_config(get_settings()))


@signals.celeryd_init.connect
@signals.beat_init.connect
def _require_embedded_broker(**_kwargs: Any) -> None:
    """A worker or beat on a missing embedded broker stops at once, saying how to start it.

    Celery would retry the absent socket forever, and nothing would ever start a server
    there: only ``cul8er up`` (or a test stack) does.
    """
    embedded = EmbeddedRedis(get_settings().data_dir)
    if app.conf.broker_url != embedded.url:
        return
    try:
        embedded.require_running()
    except ConfigError as exc:
        # Celery logs and swallows a receiver's Exception; SystemExit ends the process.
        raise SystemExit(f"{exc.code}: {exc}") from None
