"""Operation signatures: binding, checking, JSON both ways, and optional contract arguments."""

from __future__ import annotations

import datetime as dt

import pytest

from schemas.manifest import PluginType
from schemas.plans import Plan
from schemas.plugins import Ack, ProvisionRequest, UsageSample
from workers.pluginhost.contracts import check_contract
from workers.pluginhost.signatures import is_internal, signature
from workers.runtime.errors import NotFoundError, PluginError, ValidationFailedError

PLAN = Plan(name="small", instances=1)


class OlderProvisioner:
    """Written before ``platform`` was added to the contract (with a default)."""

    def provision(self, request):  # noqa: ANN001, ANN201
        return None

    def deprovision(self, tenant_id):  # noqa: ANN001, ANN201
        return Ack()

    def scale(self, request):  # noqa: ANN001, ANN201
        return None

    def meter_usage(self, tenant_id):  # noqa: ANN001, ANN201
        return None

    def health_check(self, tenant_id):  # noqa: ANN001, ANN201
        return None

    def get_resources(self, tenant_id):  # noqa: ANN001, ANN201
        return None


class Current(OlderProvisioner):
    def deprovision(self, tenant_id, platform=None):  # noqa: ANN001, ANN201
        return Ack(detail=str(platform))


def test_a_method_call_binds_to_keyword_arguments() -> None:
    sig = signature(PluginType.TENANT_PROVISIONER, "deprovision")
    assert sig.bind("acme") == {"tenant_id": "acme"}
    assert sig.bind("acme", "docker") == {"tenant_id": "acme", "platform": "docker"}
    with pytest.raises(TypeError):
        sig.bind()


def test_arguments_are_checked_with_field_paths() -> None:
    sig = signature(PluginType.TENANT_PROVISIONER, "provision")
    with pytest.raises(ValidationFailedError) as caught:
        sig.check("p", {"request": {"tenant_id": "acme", "plan": {"name": "small", "cpu": "x"}}})
    fields = [e["field"] for e in caught.value.errors]
    assert any(f.startswith("request.plan") for f in fields), fields
    assert "plugins.p.provision" in str(caught.value)
    with pytest.raises(ValidationFailedError, match="surprise"):
        sig.check("p", {"request": ProvisionRequest(tenant_id="a", plan=PLAN), "surprise": 1})


def test_arguments_and_answers_cross_as_json_and_come_back_typed() -> None:
    sig = signature(PluginType.TENANT_PROVISIONER, "provision")
    args = sig.check("p", {"request": ProvisionRequest(tenant_id="acme", plan=PLAN)})
    wire = sig.dump_args(args)
    assert wire["request"]["tenant_id"] == "acme" and isinstance(wire["request"], dict)
    assert sig.check("p", wire)["request"] == args["request"]

    usage = signature(PluginType.TENANT_PROVISIONER, "meter_usage")
    sample = UsageSample(tenant_id="acme", taken_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    dumped = usage.dump_result(sample)
    assert dumped["taken_at"].startswith("2026-01-01")
    assert usage.load_result(dumped) == sample


def test_an_unknown_operation_names_the_known_ones() -> None:
    with pytest.raises(NotFoundError, match="provision"):
        signature(PluginType.TENANT_PROVISIONER, "explode")


def test_a_plugin_may_omit_a_later_optional_argument_and_is_called_without_it() -> None:
    check_contract("older", PluginType.TENANT_PROVISIONER, OlderProvisioner)
    sig = signature(PluginType.TENANT_PROVISIONER, "deprovision")
    args = {"tenant_id": "acme", "platform": "docker"}
    assert sig.fit(OlderProvisioner, args) == {"tenant_id": "acme"}
    assert sig.fit(Current, args) == args
    assert Current().deprovision(**sig.fit(Current, args)).detail == "docker"


def test_a_plugin_missing_a_required_argument_is_still_refused() -> None:
    class Wrong(OlderProvisioner):
        def deprovision(self, tenant):  # noqa: ANN001, ANN201
            return Ack()

    with pytest.raises(PluginError, match=r"deprovision\(tenant\) should be"):
        check_contract("wrong", PluginType.TENANT_PROVISIONER, Wrong)


def test_secret_writes_are_in_process_only() -> None:
    assert is_internal(PluginType.SECRETS, "put")
    assert not is_internal(PluginType.SECRETS, "get")
    assert not is_internal(PluginType.PLATFORM, "create_instance")
