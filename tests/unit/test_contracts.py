"""Plans, payload models, the platform registry and the modules' public surface."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from pydantic import ValidationError

import plugins
import schemas
import tasks
import workers
from schemas.tasks import PUBLIC_TASKS, CreateTenant
from tasks.tenants import slugify
from workers.economics.plans import get_plan, load_catalog
from workers.pluginhost.handles import check_platform
from workers.runtime.errors import PluginError, ValidationFailedError


def test_seed_plans_have_the_seed_quotas() -> None:
    plans = load_catalog().plans
    assert [plans[p].cpu_cores for p in ("free", "starter", "pro", "enterprise")] == [
        0.5,
        2,
        8,
        None,
    ]
    assert [plans[p].memory_gb for p in ("free", "starter", "pro", "enterprise")] == [
        0.5,
        4,
        16,
        None,
    ]
    assert [plans[p].storage_gb for p in ("free", "starter", "pro", "enterprise")] == [
        1,
        20,
        100,
        None,
    ]
    assert [plans[p].max_instances for p in ("free", "starter", "pro", "enterprise")] == [
        1,
        3,
        10,
        None,
    ]
    assert [plans[p].max_requests_per_month for p in ("free", "starter", "pro", "enterprise")] == [
        10_000,
        100_000,
        1_000_000,
        None,
    ]
    assert plans["pro"].monthly_price > plans["starter"].monthly_price > plans["free"].monthly_price


def test_unknown_plan_names_the_field_and_the_known_plans() -> None:
    with pytest.raises(ValidationFailedError) as caught:
        get_plan("gold")
    assert caught.value.errors[0]["field"] == "plan"
    assert "enterprise" in str(caught.value)


def test_payloads_are_strict_and_closed() -> None:
    with pytest.raises(ValidationError):
        CreateTenant.model_validate({"name": 1, "plan": "free"})
    with pytest.raises(ValidationError):
        CreateTenant.model_validate({"name": "a", "plan": "free", "extra": 1})
    assert CreateTenant.model_validate({"name": "a", "plan": "free"}).idempotency_key is None
    assert all(
        m.model_json_schema()["additionalProperties"] is False for m in PUBLIC_TASKS.values()
    )


@pytest.mark.parametrize(
    ("name", "slug"), [("Acme Corp.", "acme-corp"), ("42 Things", "t-42-things")]
)
def test_tenant_ids_from_names(name: str, slug: str) -> None:
    assert slugify(name) == slug


def test_a_name_without_letters_needs_a_tenant_id() -> None:
    with pytest.raises(ValidationFailedError):
        slugify("!!!")


def test_a_platform_missing_operations_is_refused_with_their_names() -> None:
    class Half:
        def create_instance(self, spec):  # noqa: ANN001, ANN201
            return None

    with pytest.raises(PluginError) as caught:
        check_platform("half", Half)
    assert "destroy_instance" in str(caught.value) and "list_instances" in str(caught.value)
    assert caught.value.plugin_name == "half"


def test_the_local_platform_fulfils_the_contract() -> None:
    from plugins.platforms.local import LocalPlatform

    check_platform("local", LocalPlatform)


def _modules(package) -> list[str]:  # noqa: ANN001
    return [
        m.name
        for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
        if "migrations" not in m.name
    ]


@pytest.mark.parametrize(
    "module_name", _modules(workers) + _modules(tasks) + _modules(plugins) + _modules(schemas)
)
def test_all_is_sorted_and_names_exist(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module_name} has no __all__"
    assert list(exported) == sorted(exported)
    assert all(hasattr(module, name) for name in exported)
