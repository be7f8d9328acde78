"""The ``env`` secrets plugin: ``hello/token`` is the variable ``CUL8ER_SECRET_HELLO_TOKEN``."""

from __future__ import annotations

import hashlib
import os
import re
from typing import TYPE_CHECKING, Final

import structlog
from pydantic import BaseModel, ConfigDict, SecretStr

from schemas.plugins import Ack, SecretValue
from workers.plugin_api import NotFoundError, PermanentError, check_path, remember

if TYPE_CHECKING:
    from workers.plugin_api import PluginContext

__all__ = ["EnvSecrets", "EnvSecretsConfig", "variable_name"]

log = structlog.get_logger(__name__)

_NOT_ALNUM: Final = re.compile(r"[^A-Z0-9]")


class EnvSecretsConfig(BaseModel):
    """Config of the ``env`` secrets plugin."""

    model_config = ConfigDict(extra="forbid")

    #: Prepended to the upper-cased path to name the variable.
    prefix: str = "CUL8ER_SECRET_"


def variable_name(prefix: str, path: str) -> str:
    """The variable holding ``path``: upper-cased, every non-alphanumeric character ``_``."""
    # ASCII only: environment variable names outside [A-Z0-9_] are not portable.
    return prefix + _NOT_ALNUM.sub("_", path.upper())


class EnvSecrets:
    """Secrets read from this process's environment variables."""

    def __init__(
        self, config: EnvSecretsConfig | None = None, context: PluginContext | None = None
    ) -> None:
        self.config = config or EnvSecretsConfig()
        self.context = context

    def get(self, path: str) -> SecretValue:
        """The value of the path's variable; ``NotFoundError`` when it is not set."""
        var = variable_name(self.config.prefix, check_path(path))
        value = os.environ.get(var)
        if value is None:
            raise NotFoundError(f"secret {path!r} not found: environment variable {var} is not set")
        remember(value)
        return SecretValue(path=path, value=SecretStr(value), version=_version(value))

    def put(self, path: str, value: str) -> Ack:
        """Set the path's variable in this process only: other workers never see it."""
        var = variable_name(self.config.prefix, check_path(path))
        remember(value)
        os.environ[var] = value
        log.info("secret_put", provider="env", path=path, variable=var)
        return Ack(ok=True, detail=f"set {var} in this process only")

    def rotate(self, path: str) -> SecretValue:
        """Refuse: whoever sets the environment rotates env secrets."""
        var = variable_name(self.config.prefix, check_path(path))
        raise PermanentError(
            f"cannot rotate secret {path!r}: env secrets are rotated by whoever sets the "
            f"environment (change {var} and restart the workers), or use the file provider"
        )


def _version(value: str) -> str:
    # Changes whenever the value does, the same in every process that sees the variable.
    return hashlib.sha256(value.encode()).hexdigest()[:12]
