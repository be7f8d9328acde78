"""Where the data and the database are and how to log: the settings every command reads.

:class:`~workers.runtime.settings.Settings` costs pydantic-settings' import and the
validation of some hundred fields; a command that only reads the database needs four of
them. :func:`essentials` reads those four the way ``Settings`` does (``CUL8ER_<NAME>`` in
the environment, any case, before a ``.env`` file in the working folder) without building
it. A ``log_format`` that is none of the three is left to ``get_settings()``, whose error
the command then shows.
The other fields are not read here, so a mistake in one of them shows when a command that
needs it runs. It lives in ``runtime`` beside ``settings.py``, because what it answers is
settings: workers read the same variables through ``Settings``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from workers.runtime.settings import Settings

__all__ = ["Essentials", "essentials", "sqlite_url"]

#: ``Settings.model_config``'s ``env_prefix`` and ``env_file``.
ENV_PREFIX: Final = "cul8er_"
ENV_FILE: Final = ".env"
#: The values ``Settings.log_format`` accepts.
LOG_FORMATS: Final = ("auto", "json", "console")


def sqlite_url(data_dir: Path) -> str:
    """The embedded default database: ``cul8er.db`` under ``data_dir``."""
    return f"sqlite:///{data_dir / 'cul8er.db'}"


@dataclass(frozen=True)
class Essentials:
    """The fields of :class:`~workers.runtime.settings.Settings` every command reads."""

    data_dir: Path
    database_url: str | None
    log_format: str
    log_level: str

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL, the SQLite file under ``data_dir`` unless one is set."""
        return self.database_url or sqlite_url(self.data_dir)

    @classmethod
    def of(cls, settings: Settings) -> Essentials:
        """The same four fields of full settings."""
        return cls(
            data_dir=settings.data_dir,
            database_url=settings.database_url,
            log_format=settings.log_format,
            log_level=settings.log_level,
        )


def essentials() -> Essentials:
    """This process's essentials: those of ``get_settings()`` once it has loaded, else read."""
    loaded = sys.modules.get("workers.runtime.settings")
    if loaded is not None and loaded.get_settings.cache_info().currsize:
        return Essentials.of(loaded.get_settings())
    read = _read(("data_dir", "database_url", "log_format", "log_level"))
    log_format = read.get("log_format", "auto")
    if log_format not in LOG_FORMATS:
        from workers.runtime.settings import get_settings

        return Essentials.of(get_settings())
    return Essentials(
        # As the ``Settings._absolute`` validator pins it (an empty value is the cwd there too).
        data_dir=Path(read.get("data_dir", "var")).expanduser().resolve(),
        database_url=read.get("database_url"),
        log_format=log_format,
        log_level=read.get("log_level", "INFO"),
    )


def _read(names: tuple[str, ...]) -> dict[str, str]:
    """The fields among ``names`` that are set: the environment first, then ``.env``.

    A ``.env`` name without a value counts as unset, as in pydantic-settings.
    """
    environ = {key.lower(): value for key, value in os.environ.items()}
    found: dict[str, str] = {}
    dotenv: dict[str, str | None] | None = None
    for name in names:
        key = ENV_PREFIX + name
        if key in environ:
            found[name] = environ[key]
            continue
        if dotenv is None:
            dotenv = _dotenv()
        value = dotenv.get(key)
        if value is not None:
            found[name] = value
    return found


def _dotenv() -> dict[str, str | None]:
    """The working folder's ``.env`` file, names lower-cased, read as pydantic-settings reads it."""
    path = Path(ENV_FILE).expanduser()
    if not (path.is_file() or path.is_fifo()):
        return {}
    from dotenv import dotenv_values

    return {key.lower(): value for key, value in dotenv_values(path, encoding="utf-8").items()}
