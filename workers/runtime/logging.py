"""structlog configuration: key=value on a terminal, JSON otherwise, bound to the task.

A command-line process may log nothing at all, and importing structlog costs more than many
commands take: ``configure_logging(lazy=True)`` puts the handler in place at once but
imports structlog only when a record is formatted or some module imports it, and configures
it then, before anything can log through it.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from workers.runtime.redaction import RedactingFilter

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

__all__ = ["configure_logging"]

_configured = False


def configure_logging(*, fmt: str = "auto", level: str = "INFO", lazy: bool = False) -> None:
    """Configure structlog and route the standard library's logging through it (once).

    With ``lazy``, structlog is imported and configured when first needed, not now.
    """
    global _configured
    if _configured:
        return
    _configured = True
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LazyFormatter(use_json) if lazy else _formatter(use_json))
    # On the handler, not a logger: it sees every record, Celery's own loggers' too.
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if not lazy or "structlog" in sys.modules:
        _configure_structlog()
    else:
        sys.meta_path.insert(0, _AfterImport("structlog", _configure_structlog))


def _shared() -> list[Any]:
    """The processors structlog's own loggers and the standard library's records share."""
    import structlog

    return [
        # First, so every line carries task_id, workflow_id and tenant_id when bound.
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _configure_structlog() -> None:
    import structlog

    structlog.configure(
        processors=[
            # First: a line below the level costs one check, not the whole chain (a step
            # logs and observes at INFO; a worker at WARNING would otherwise pay for each).
            structlog.stdlib.filter_by_level,
            *_shared(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def _formatter(use_json: bool) -> logging.Formatter:
    """The formatter of every line: JSON or key=value, secrets masked, tracebacks plain."""
    import structlog

    from workers.runtime.redaction import redact_processor

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
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if use_json else _identity,
            # Last before rendering, tracebacks included: a resolved secret never reaches a log.
            redact_processor,
            renderer,
        ],
    )


class _LazyFormatter(logging.Formatter):
    """:func:`_formatter`'s formatter, built when the first record is formatted."""

    def __init__(self, use_json: bool) -> None:
        super().__init__()
        self._use_json = use_json
        self._built: logging.Formatter | None = None

    def format(self, record: logging.LogRecord) -> str:
        if self._built is None:
            self._built = _formatter(self._use_json)
        return self._built.format(record)


class _AfterImport:
    """A meta path finder that runs ``then`` right after the module ``name`` is first executed.

    It finds nothing itself: it asks the finders after it for the module's spec and wraps
    that spec's loader, then steps out of ``sys.meta_path``.
    """

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self._name = name
        self._then = then

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != self._name:
            return None
        sys.meta_path.remove(self)
        spec: ModuleSpec | None = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        if spec is None:
            return None
        loader = spec.loader
        if loader is None:
            return spec  # a namespace package runs no code: there is no "after" to wait for
        execute = loader.exec_module
        then = self._then

        def exec_module(module: ModuleType) -> None:
            # Put back first: a loader may serve other modules (a zip importer does).
            loader.exec_module = execute  # type: ignore[method-assign]
            execute(module)
            then()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _identity(_logger: Any, _name: str, event: Any) -> Any:
    return event
