"""Loading the plan catalog from YAML."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import ValidationError

from schemas.plans import Plan, PlanCatalog
from workers.runtime.errors import ConfigError, ValidationFailedError

__all__ = ["BUILTIN_PLANS", "get_plan", "load_catalog"]

#: The catalog shipped with cul8er.
BUILTIN_PLANS = Path(__file__).with_name("plans.yaml")


@lru_cache(maxsize=8)
def _load(path: Path, mtime: float) -> PlanCatalog:
    try:
        data = yaml.safe_load(path.read_text())
        return PlanCatalog.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"invalid plan catalog {path}: {exc}") from exc


def load_catalog(path: Path | None = None) -> PlanCatalog:
    """The catalog at ``path`` (the built-in one by default), reloaded when the file changes."""
    path = path or BUILTIN_PLANS
    try:
        mtime = path.stat().st_mtime
    except OSError as exc:
        raise ConfigError(f"plan catalog {path} is unreadable: {exc}") from exc
    return _load(path, mtime)


def get_plan(name: str, path: Path | None = None) -> Plan:
    """The plan ``name``; an unknown name is a validation error on the ``plan`` field."""
    catalog = load_catalog(path)
    plan = catalog.plans.get(name)
    if plan is None:
        known = ", ".join(sorted(catalog.plans))
        message = f"unknown plan {name[:64]!r}; known plans: {known}"
        raise ValidationFailedError(message, errors=[{"field": "plan", "message": message}])
    return plan
