"""structlog configuration: key=value on a terminal, JSON otherwise, bound to the task."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from workers.runtime.redaction import RedactingFilter, redact_processor

__all__ = ["configure_logging"]

_configured = False


def configure_logging(*, fmt: str = "auto", level: str = "INFO") -> None:
    """Configure structlog and route the standard library's logging through it (once)."""
    global _configured
    if _configured:
        return
    _configured = True
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        # First, so every line carries task_id, workflow_id and tenant_id when bound.
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(
            colors=False,
            pad_event_to=0,
            # Plain tracebacks: rich's would print every frame's locals (a request's headers,
            # a bearer token) into the log.
            exception_formatter=structlog.dev.plain_traceback,
        )
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if use_json else _identity,
            # Last before rendering, tracebacks included: a resolved secret never reaches a log.
            redact_processor,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    # On the handler, not a logger: it sees every record, Celery's own loggers' too.
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _identity(_logger: Any, _name: str, event: Any) -> Any:
    return event
