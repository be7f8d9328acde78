"""A plugin's manifest: who it is, what it needs, what it may do, and what its files hash to."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

__all__ = ["Manifest", "Permission", "PluginType", "Requirement"]

#: Semantic versions only: MAJOR.MINOR.PATCH with optional pre-release and build.
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
)

PluginName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class PluginType(StrEnum):
    """The six kinds of plugin, each with its own contract."""

    PLATFORM = "platform"
    TENANT_PROVISIONER = "tenant_provisioner"
    STRATEGY = "strategy"
    LOAD_BALANCER = "load_balancer"
    OBSERVER = "observer"
    SECRETS = "secrets"


class Permission(StrEnum):
    """What a plugin's code may reach beyond computing."""

    #: Open sockets, make HTTP calls.
    NETWORK = "network"
    #: Start processes.
    EXEC = "exec"
    #: Read and write files outside its own folder.
    FILESYSTEM = "filesystem"
    #: Read cul8er's database.
    DATABASE = "database"
    #: Resolve ``${secret:…}`` values.
    SECRETS = "secrets"


def _specifier(value: str) -> str:
    try:
        SpecifierSet(value)
    except InvalidSpecifier as exc:
        raise ValueError(f"not a version range: {value!r} (use e.g. '>=1.2,<2')") from exc
    return value


class Requirement(BaseModel):
    """Another plugin, by name, within a version range (``""`` is any version)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PluginName
    versions: str = ""

    @field_validator("versions")
    @classmethod
    def _range(cls, value: str) -> str:
        return _specifier(value)

    def allows(self, version: str) -> bool:
        """Whether ``version`` is inside this requirement's range."""
        return Version(version) in SpecifierSet(self.versions)


class Manifest(BaseModel):
    """``cul8er-plugin.json`` (or a module's ``MANIFEST``): validated before any import."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PluginName
    version: str
    type: PluginType
    description: str = ""
    #: The module that holds the plugin's implementation and tasks.
    module: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][\w.]*$")]
    #: cul8er plugin API versions this plugin works with, e.g. ``">=1,<2"``.
    api: str = ">=1,<2"
    requires: tuple[Requirement, ...] = ()
    conflicts: tuple[Requirement, ...] = ()
    permissions: frozenset[Permission] = frozenset()
    #: The attribute of ``module`` that builds the plugin: called as ``factory(config, context)``.
    factory: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][\w.]*$")] = "Plugin"
    #: ``module:Class`` of the pydantic model validating the plugin's config.
    config_model: str | None = None
    #: Untrusted plugins run on the sandbox queue, under the sandbox worker's limits.
    trusted: bool = False
    #: The queue its tasks go to; ``None`` is ``plugins.<name>`` (or the sandbox queue).
    queue: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,200}$")] | None = None
    #: Relative path → sha256 of every file of the plugin (the manifest itself excluded).
    files: dict[str, Sha256] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not SEMVER.match(value):
            raise ValueError(f"version {value!r} is not semantic (MAJOR.MINOR.PATCH)")
        try:
            Version(value)
        except InvalidVersion as exc:
            raise ValueError(f"version {value!r} cannot be compared: {exc}") from exc
        return value

    @field_validator("api")
    @classmethod
    def _api(cls, value: str) -> str:
        return _specifier(value)

    @property
    def parsed_version(self) -> Version:
        """The version, comparable."""
        return Version(self.version)

    def supports_api(self, api_version: str) -> bool:
        """Whether this plugin declares support for cul8er's plugin API ``api_version``."""
        return Version(api_version) in SpecifierSet(self.api)
