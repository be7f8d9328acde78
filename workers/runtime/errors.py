"""The errors cul8er raises, grouped by what the caller must do.

    Cul8erError
    ├── TransientError        retry later: timeouts, 5xx, lost connections, a busy database
    ├── PermanentError        never retry: the step fails and the workflow compensates
    │   ├── ValidationFailedError   bad input to a public task (names the fields)
    │   ├── ConflictError           the subject is busy or in the wrong state
    │   ├── NotFoundError           the subject does not exist (for this tenant)
    │   ├── PoolExhaustedError      no free subnet is left in the pool
    │   └── PluginRefusedError      an operator's plugin action broke a rule (names it)
    ├── ConfigError           bad settings or plan catalog: fail at start-up
    └── PluginError           a plugin is missing operations or misbehaves (carries plugin_name)

Retry policy keys off these classes, never off message text.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "ConflictError",
    "Cul8erError",
    "NotFoundError",
    "PermanentError",
    "PluginError",
    "PluginRefusedError",
    "PoolExhaustedError",
    "TransientError",
    "UnavailableError",
    "ValidationFailedError",
]


class Cul8erError(Exception):
    """Root of every error cul8er raises on purpose."""

    #: A stable machine-readable code, used in task results.
    code: str = "error"

    def to_dict(self) -> dict[str, Any]:
        """The error as a JSON-ready dict for task results and the ledger."""
        return {"code": self.code, "message": str(self)}


class TransientError(Cul8erError):
    """The operation may succeed if tried again later."""

    code = "transient"


class PermanentError(Cul8erError):
    """The operation will not succeed by trying again."""

    code = "permanent"


class ValidationFailedError(PermanentError):
    """A task's input did not validate; ``errors`` lists ``{field, message}`` per problem."""

    code = "validation_error"

    def __init__(self, message: str, *, errors: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.errors = errors

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "errors": self.errors}


class ConflictError(PermanentError):
    """The subject exists already, is busy, or is in a state that forbids the change."""

    code = "conflict"


class NotFoundError(PermanentError):
    """The subject does not exist."""

    code = "not_found"


class PoolExhaustedError(PermanentError):
    """Every subnet of the pool is allocated."""

    code = "pool_exhausted"


class PluginRefusedError(PermanentError):
    """A plugin action (install, reload, enable) was refused; the message says why."""

    code = "plugin_refused"


class UnavailableError(PermanentError):
    """What the request needs is not there (a load balancer, an engine); the message names it."""

    code = "unavailable"


class ConfigError(Cul8erError):
    """Settings or the plan catalog are invalid."""

    code = "config_error"


class PluginError(Cul8erError):
    """A plugin does not fulfil its contract."""

    code = "plugin_error"

    def __init__(self, message: str, *, plugin_name: str) -> None:
        super().__init__(message)
        self.plugin_name = plugin_name
