"""Operation signatures: the one place that knows how "operation X of plugin type T" is called.

Every contract operation (:mod:`workers.pluginhost.contracts`) becomes, once, a
:class:`Signature`: a pydantic model of its keyword arguments and an adapter of its answer,
read from the protocol's annotations. Everything that crosses a plugin boundary goes through
it: a handle binding a method call to keyword arguments (:meth:`Signature.bind`), checking
them with field paths (:meth:`Signature.check`), turning them into JSON for a task message
(:meth:`Signature.dump_args`), and the answer into JSON and back
(:meth:`Signature.dump_result`, :meth:`Signature.load_result`).
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model

from schemas.manifest import PluginType
from workers.pluginhost.contracts import CONTRACTS, operations
from workers.runtime.errors import NotFoundError, ValidationFailedError

__all__ = ["INTERNAL_OPERATIONS", "Signature", "is_internal", "signature"]

#: Operations that take a secret value as an argument: callable in-process, never a task.
INTERNAL_OPERATIONS: Final[typing.Mapping[PluginType, frozenset[str]]] = {
    PluginType.SECRETS: frozenset({"put"}),
}


def is_internal(plugin_type: PluginType, op: str) -> bool:
    """Whether ``op`` is callable in-process only (it takes a secret value)."""
    return op in INTERNAL_OPERATIONS.get(plugin_type, frozenset())


@dataclass(frozen=True)
class Signature:
    """How one operation of one plugin type is called and what it answers."""

    plugin_type: PluginType
    op: str
    #: The method's signature on the contract (with ``self``).
    method: inspect.Signature
    #: The keyword arguments as a closed model.
    args: type[BaseModel]
    #: The answer.
    result: TypeAdapter[Any]

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A method call's arguments as keyword arguments (``TypeError`` if they do not fit)."""
        bound = self.method.bind(None, *args, **kwargs)
        return {name: value for name, value in bound.arguments.items() if name != "self"}

    def check(self, plugin: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` validated: Python objects keyed by parameter.

        Raises:
            ValidationFailedError: naming each bad field by its path.
        """
        try:
            checked = self.args.model_validate(kwargs)
        except ValidationError as exc:
            errors = [
                {
                    "field": ".".join(str(part) for part in err["loc"]) or "(root)",
                    "message": err["msg"][:200],
                }
                for err in exc.errors()
            ]
            raise ValidationFailedError(
                f"invalid arguments to plugins.{plugin}.{self.op}: "
                + "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                errors=errors,
            ) from None
        return {name: getattr(checked, name) for name in type(checked).model_fields}

    def fit(self, implementation: type, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` without the optional ones ``implementation``'s method does not declare.

        A plugin written against an earlier contract may lack a parameter added since with
        a default (``check_contract`` lets it load); it is called without it.
        """
        accepted = _accepted(implementation, self.op)
        if accepted is None:
            return args
        return {name: value for name, value in args.items() if name in accepted}

    @staticmethod
    def dump_args(args: dict[str, Any]) -> dict[str, Any]:
        """Checked arguments as JSON-ready data for a task message (models become dicts)."""
        return {name: _dump(value) for name, value in args.items()}

    def dump_result(self, value: Any) -> Any:
        """The operation's answer as JSON-ready data."""
        return self.result.dump_python(value, mode="json")

    def load_result(self, data: Any) -> Any:
        """A JSON answer back as the operation's Python type."""
        return self.result.validate_python(data)


@functools.cache
def signature(plugin_type: PluginType, op: str) -> Signature:
    """The signature of ``op`` for plugins of ``plugin_type``, built once per process.

    Raises:
        NotFoundError: ``op`` is not an operation of ``plugin_type``.
    """
    if op not in operations(plugin_type):
        raise NotFoundError(
            f"{plugin_type.value} plugins have no operation {op!r}; "
            f"they have: {', '.join(operations(plugin_type))}"
        )
    method = getattr(CONTRACTS[plugin_type], op)
    hints = typing.get_type_hints(method)
    method_signature = inspect.signature(method)
    fields: dict[str, Any] = {}
    for name, param in method_signature.parameters.items():
        if name == "self":
            continue
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[name] = (hints[name], default)
    model = create_model(
        f"{plugin_type.value}.{op}", __config__=ConfigDict(extra="forbid"), **fields
    )
    return Signature(
        plugin_type=plugin_type,
        op=op,
        method=method_signature,
        args=model,
        result=TypeAdapter(hints.get("return", type(None))),
    )


@functools.cache
def _accepted(implementation: type, op: str) -> frozenset[str] | None:
    """The parameter names of ``implementation.op``; ``None`` when it takes ``**kwargs``."""
    params = inspect.signature(getattr(implementation, op)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(item) for item in value]
    return value
