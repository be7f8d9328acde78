"""``${secret:…}`` references in configs, resolved for a plugin call and never stored.

A config names a secret as ``${secret:path}`` (the default provider, ``secrets_provider``)
or ``${secret:provider:path}``; :func:`resolve` swaps each reference for its value in a
copy of the config, so the stored config never holds one. Every value resolved is handed
to the runtime's redaction (:func:`workers.runtime.redaction.remember`), which masks it in
every later log line.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from workers.runtime.errors import PermanentError
from workers.runtime.redaction import remember

if TYPE_CHECKING:
    pass

__all__ = [
    "PATH_PATTERN",
    "PROVIDER_PATTERN",
    "REF_PATTERN",
    "check_path",
    "find_refs",
    "resolve",
]

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
