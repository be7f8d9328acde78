"""Redaction: secret values masked in every log line, structlog's and the stdlib's alike.

A value handed to :func:`remember` (every resolved secret, a plugin's own credentials) is
masked from then on by :func:`redact`, the structlog processor :func:`redact_processor` and
the stdlib :class:`RedactingFilter` that :mod:`workers.runtime.logging` installs.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from structlog.typing import EventDict, WrappedLogger

__all__ = [
    "MASK",
    "MIN_SECRET_LENGTH",
    "RedactingFilter",
    "redact",
    "redact_processor",
    "redact_text",
    "remember",
]

#: What a secret value is replaced by.
MASK: Final = "**********"
#: Shorter values are not remembered: masking "on" or "1" would garble every log line.
MIN_SECRET_LENGTH: Final = 4

_lock = threading.Lock()
_remembered: set[str] = set()
#: One alternation of every remembered value, longest first (so a value that is a prefix of
#: another never leaves the other's tail in clear); ``None`` while nothing is remembered.
#: Replaced as a whole under ``_lock``, read without it: readers see an old or new pattern.
_pattern: re.Pattern[str] | None = None


def remember(value: str) -> None:
    """Mask ``value`` in every later :func:`redact` of this process (if 4+ characters)."""
    global _pattern
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
        return
    with _lock:
        if value in _remembered:
            return
        _remembered.add(value)
        ordered = sorted(_remembered, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(v) for v in ordered))


def redact_text(text: str) -> str:
    """``text`` with every remembered secret value replaced by ``**********``."""
    pattern = _pattern
    if pattern is None:
        return text
    return pattern.sub(MASK, text)


def redact(value: Any) -> Any:
    """A copy of ``value`` with remembered secrets masked in every string it nests.

    Dicts (keys and values), lists and tuples are rebuilt; other objects are returned as
    they are. Returns ``value`` itself when nothing is remembered: this runs on every log line.
    """
    pattern = _pattern
    if pattern is None:
        return value
    return _redact(value, pattern)


def _redact(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return pattern.sub(MASK, value)
    if isinstance(value, Mapping):
        return {_redact(key, pattern): _redact(item, pattern) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact(item, pattern) for item in value]
    if isinstance(value, tuple):
        return tuple(_redact(item, pattern) for item in value)
    return value


def redact_processor(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor masking remembered secrets in the event dict.

    Put it after ``format_exc_info`` (so tracebacks are masked too) and before the renderer.
    """
    pattern = _pattern
    if pattern is None:
        return event_dict
    return {key: _redact(item, pattern) for key, item in event_dict.items()}


class RedactingFilter(logging.Filter):
    """A stdlib logging filter masking remembered secrets in records (Celery's own logs).

    Attach it to handlers, not loggers: a logger's filters skip records from its children.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask the record's message, arguments and traceback text; never drops a record."""
        pattern = _pattern
        if pattern is None:
            return True
        if isinstance(record.msg, Mapping):
            # structlog's stdlib integration carries the event dict as ``msg``.
            record.msg = _redact(record.msg, pattern)
            record.args = _redact(record.args, pattern)
        elif record.args:
            try:
                # Formatting first also masks secrets in args' own str(), e.g. exceptions.
                message = record.getMessage()
            except (TypeError, ValueError):
                # A broken format string: logging reports it later; mask the parts anyway.
                record.msg = _redact(record.msg, pattern)
                record.args = _redact(record.args, pattern)
            else:
                record.msg = pattern.sub(MASK, message)
                record.args = ()
        elif not isinstance(record.msg, str):
            text = str(record.msg)
            masked = pattern.sub(MASK, text)
            if masked != text:
                record.msg = masked
        else:
            record.msg = pattern.sub(MASK, record.msg)
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so the traceback is printed masked.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = pattern.sub(MASK, record.exc_text)
        return True
