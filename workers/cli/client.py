"""Calling a public task from the command line, as another service would: by name.

On the embedded default the broker is ``cul8er up``'s: the CLI is only its client, so with
no ``cul8er up`` running it says so and exits, and starts no broker of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from workers.cli.console import complain, fail
from workers.runtime.errors import ConfigError

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["ANSWER_TIMEOUT", "call", "celery_app"]

#: How long a command waits for a worker's answer unless told otherwise (seconds).
ANSWER_TIMEOUT = 30.0


def celery_app() -> Celery:
    """cul8er's Celery app, once its broker is known to answer (exit code 2 otherwise)."""
    # Imported here: commands that only read the database never load Redis, Celery or the
    # full settings.
    from workers.runtime.embedded import EmbeddedRedis
    from workers.runtime.settings import get_settings

    settings = get_settings()
    if settings.embedded_broker:
        try:
            EmbeddedRedis(settings.data_dir).require_running()
        except ConfigError as exc:
            raise fail(exc.code, str(exc), exit_code=2) from None
    from workers.app import app

    return app


def call(task: str, kwargs: dict[str, Any], *, timeout: float = ANSWER_TIMEOUT) -> Any:
    """Enqueue the public task ``task`` by name and wait for its answer (exit code 2 if none)."""
    # Imported here: commands that only read the database start without loading Celery.
    from celery.exceptions import TimeoutError as NoAnswerError

    result = celery_app().send_task(task, kwargs=kwargs)
    try:
        return result.get(timeout=timeout)
    except (TimeoutError, NoAnswerError):
        complain(
            (f"no answer from a worker within {timeout:.0f} s", "red"),
            " (is `cul8er up` running?)",
        )
        raise typer.Exit(2) from None
