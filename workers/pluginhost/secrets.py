"""``${secret:…}`` references in configs, and redaction of resolved values from every log.

A config names a secret as ``${secret:path}`` (the default provider, ``secrets_provider``)
or ``${secret:provider:path}``; :func:`resolve` swaps each reference for its value in a
copy of the config, so the stored config never holds one. Every value resolved (or
passed to :func:`remember`) is masked from then on by :func:`redact`, the structlog
processor :func:`redact_processor` and the stdlib :class:`RedactingFilter`.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from workers.runtime.errors import PermanentError

if TYPE_CHECKING:
    from structlog.typing import EventDict, WrappedLogger

__all__ = [
    "MASK",
    "MIN_SECRET_LENGTH",
    "PATH_PATTERN",
    "PROVIDER_PATTERN",
    "REF_PATTERN",
    "RedactingFilter",
    "check_path",
    "find_refs",
    "redact",
    "redact_processor",
    "redact_text",
    "remember",
    "resolve",
]

#: What a secret value is replaced by.
MASK: Final = "**********"
#: Shorter values are not remembered: masking "on" or "1" would garble every log line.
MIN_SECRET_LENGTH: Final = 4
#: A provider name, as in ``${secret:file:db/password}``.
PROVIDER_PATTERN: Final = r"[a-z][a-z0-9_]*"
#: A secret path. ``:`` separates the provider, and braces, ``$`` and blanks would make a
#: reference ambiguous inside text, so none of them can be part of a path.
PATH_PATTERN: Final = r"[^\s:{}$]+"
#: ``${secret:path}`` or ``${secret:provider:path}``.
REF_PATTERN: Final = re.compile(
    rf"\$\{{secret:(?:(?P<provider>{PROVIDER_PATTERN}):)?(?P<path>{PATH_PATTERN})\}}"
)
_PATH_RE: Final = re.compile(PATH_PATTERN)


def check_path(path: str) -> str:
    """Return ``path`` if a reference can name it; ``PermanentError`` otherwise."""
    if not isinstance(path, str) or not _PATH_RE.fullmatch(path):
        raise PermanentError(
            f"invalid secret path {path!r}: it must be non-empty, without blanks, ':', "
            "'{', '}' or '$'"
        )
    return path


# -- references -------------------------------------------------------------------------------


def find_refs(value: Any) -> list[tuple[str | None, str]]:
    """Every ``(provider, path)`` referenced in ``value``, once each, in order of appearance.

    ``provider`` is ``None`` when the reference does not name one (the default applies).
    Strings inside dicts (values only), lists and tuples are searched.
    """
    found: dict[tuple[str | None, str], None] = {}
    _walk_refs(value, found)
    return list(found)


def _walk_refs(value: Any, found: dict[tuple[str | None, str], None]) -> None:
    if isinstance(value, str):
        for match in REF_PATTERN.finditer(value):
            found.setdefault((match["provider"], match["path"]), None)
    elif isinstance(value, Mapping):
        for item in value.values():
            _walk_refs(item, found)
    elif isinstance(value, list | tuple):
        for item in value:
            _walk_refs(item, found)


def resolve(value: Any, *, lookup: Callable[[str, str], str], default_provider: str) -> Any:
    """A deep copy of ``value`` with every reference replaced by ``lookup(provider, path)``.

    References may be a whole string or embedded in text; each distinct reference is looked
    up once. Every value looked up is :func:`remember`-ed, so logs mask it. Errors raised
    by ``lookup`` (``NotFoundError``, ``TransientError``…) propagate unchanged.
    """
    cache: dict[tuple[str, str], str] = {}

    def replace(match: re.Match[str]) -> str:
        key = (match["provider"] or default_provider, match["path"])
        if key not in cache:
            secret = lookup(*key)
            remember(secret)
            cache[key] = secret
        return cache[key]

    return _resolve(value, replace)


def _resolve(value: Any, replace: Callable[[re.Match[str]], str]) -> Any:
    if isinstance(value, str):
        return REF_PATTERN.sub(replace, value)
    if isinstance(value, Mapping):
        return {key: _resolve(item, replace) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, replace) for item in value]
    if isinstance(value, tuple):
        return tuple(_resolve(item, replace) for item in value)
    return copy.deepcopy(value)


# -- redaction --------------------------------------------------------------------------------

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
