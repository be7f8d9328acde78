"""``cul8er.events.deliver``: one event to every active observer plugin."""

from __future__ import annotations

from typing import Any

import structlog

from schemas.events import Event
from workers.engine.steps import backoff
from workers.pluginhost.bus import DELIVER_TASK, active_observers
from workers.pluginhost.calls import invoke
from workers.runtime.app import app
from workers.runtime.errors import Cul8erError, TransientError
from workers.runtime.settings import get_settings

__all__ = ["deliver"]

log = structlog.get_logger(__name__)

#: Deliveries of one event to one observer before it is dropped (and logged).
MAX_ATTEMPTS = 6


@app.task(name=DELIVER_TASK, bind=True, ignore_result=True)
def deliver(
    self: Any, event: dict[str, Any], only: list[str] | None = None, attempt: int = 1
) -> None:
    """Call ``observe_event`` of each observer; retry only the ones that failed for now.

    Delivered twice, observers see the same ``event_id`` twice (webhooks send it as the
    Idempotency-Key), which is how they recognise the repeat.
    """
    parsed = Event.model_validate(event)
    retry: list[str] = []
    for name in only if only is not None else active_observers():
        try:
            invoke(name, "observe_event", event=parsed)
        except TransientError as exc:
            retry.append(name)
            log.warning("observer_failed", observer=name, attempt=attempt, error=str(exc))
        except Cul8erError as exc:
            log.error("observer_failed", observer=name, attempt=attempt, error=str(exc))
        except Exception:
            # One observer's bug never stops the others.
            log.exception("observer_crashed", observer=name)
    if retry and attempt < MAX_ATTEMPTS:
        self.apply_async(
            kwargs={"event": event, "only": retry, "attempt": attempt + 1},
            # Under the visibility timeout: a countdown held longer is delivered twice.
            countdown=backoff(
                attempt, base=1.0, cap=min(60.0, get_settings().broker_visibility_timeout / 2)
            ),
        )
    elif retry:
        log.error("observer_gave_up", observers=retry, event_id=str(parsed.event_id))
