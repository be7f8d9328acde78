"""The API's policy: every role × every action, the environment rules and tenant ownership."""

from __future__ import annotations

import pytest

from workers.api.roles import (
    Action,
    Forbidden,
    NotVisible,
    Principal,
    Role,
    authorize,
    visible_tenants,
)
from workers.runtime.errors import NotFoundError

# The product spec as a grid, to be read against it: X may, - may not. Columns, in order:
#   tenant_read tenant_write | workflow_read | deployment_read deployment_write deployment_approve
#   | plugin_read plugin_install plugin_admin tenant_plugin_write | usage_read billing_write
#   | audit_read
COLUMNS = [
    Action.TENANT_READ,
    Action.TENANT_WRITE,
    Action.WORKFLOW_READ,
    Action.DEPLOYMENT_READ,
    Action.DEPLOYMENT_WRITE,
    Action.DEPLOYMENT_APPROVE,
    Action.PLUGIN_READ,
    Action.PLUGIN_INSTALL,
    Action.PLUGIN_ADMIN,
    Action.TENANT_PLUGIN_WRITE,
    Action.USAGE_READ,
    Action.BILLING_WRITE,
    Action.AUDIT_READ,
]
EXPECTED = {
    #                        tenant    wf  deployment     plugin           usage     audit
    #                        rd  wr    rd  rd  wr  appr   rd  inst adm  tp  rd  bill  rd
    Role.ADMIN:             "X   X     X   X   X   X      X   X    X    X   X   X     X",
    Role.OPERATOR:          "X   X     X   X   X   -      X   -    -    -   X   -     X",
    Role.APPROVER:          "X   -     X   X   -   X      -   -    -    -   -   -     -",
    Role.TENANT_OWNER:      "X   -     X   X   -   -      -   -    -    X   -   -     -",
    Role.PLUGIN_DEVELOPER:  "-   -     -   X   X   -      X   X    -    -   -   -     -",
    Role.BILLING:           "X   -     -   -   -   -      -   -    -    -   X   X     -",
    Role.VIEWER:            "X   -     X   X   -   -      X   -    -    -   X   -     X",
}  # fmt: skip

OWN = "acme-corp"
OTHER = "globex"


def _principal(role: Role) -> Principal:
    tenants = frozenset({OWN}) if role is Role.TENANT_OWNER else frozenset()
    return Principal(subject=f"{role}-1", role=role, tenants=tenants)


def _cases() -> list[tuple[Role, Action, bool]]:
    cases = []
    for role, row in EXPECTED.items():
        marks = row.split()
        assert len(marks) == len(COLUMNS), role
        for action, mark in zip(COLUMNS, marks, strict=True):
            cases.append((role, action, mark == "X"))
    return cases


def test_the_grid_covers_every_role_and_every_action():
    assert set(EXPECTED) == set(Role)
    assert sorted(COLUMNS) == sorted(Action)
    assert len(COLUMNS) == len(set(COLUMNS))


@pytest.mark.parametrize(("role", "action", "allowed"), _cases())
def test_every_role_and_action(role, action, allowed):
    # Own tenant and an environment every deploying role may use, so only the table decides.
    call = {"tenant_id": OWN, "environment": "development", "plugin_deployment": True}
    if allowed:
        authorize(_principal(role), action, **call)
        return
    with pytest.raises(Forbidden) as refused:
        authorize(_principal(role), action, **call)
    assert refused.value.code == "forbidden"
    assert f"'{role.value}'" in str(refused.value)
    assert f"'{action.value}'" in str(refused.value)
    assert (refused.value.role, refused.value.action) == (role, action)


# role, environment, plugin deployment, allowed
ENVIRONMENT_RULES = [
    (Role.ADMIN, "production", False, True),
    (Role.ADMIN, "production", True, True),
    (Role.ADMIN, "qa", False, True),
    (Role.ADMIN, None, False, True),
    (Role.OPERATOR, "production", False, False),
    (Role.OPERATOR, "production", True, False),
    (Role.OPERATOR, "qa", False, True),
    (Role.OPERATOR, "development", False, True),
    (Role.OPERATOR, "development", True, True),
    (Role.OPERATOR, None, False, False),
    (Role.PLUGIN_DEVELOPER, "development", True, True),
    (Role.PLUGIN_DEVELOPER, "qa", True, True),
    (Role.PLUGIN_DEVELOPER, "production", True, False),
    (Role.PLUGIN_DEVELOPER, "staging", True, False),
    (Role.PLUGIN_DEVELOPER, None, True, False),
    (Role.PLUGIN_DEVELOPER, "development", False, False),
    (Role.PLUGIN_DEVELOPER, "qa", False, False),
    (Role.APPROVER, "development", False, False),
    (Role.VIEWER, "development", True, False),
    (Role.BILLING, "qa", False, False),
]


@pytest.mark.parametrize(("role", "environment", "plugin", "allowed"), ENVIRONMENT_RULES)
def test_deployment_environments(role, environment, plugin, allowed):
    principal = _principal(role)

    def deploy():
        authorize(
            principal,
            Action.DEPLOYMENT_WRITE,
            environment=environment,
            plugin_deployment=plugin,
        )

    if allowed:
        deploy()
        return
    with pytest.raises(Forbidden, match=f"'{role.value}'"):
        deploy()


def test_production_is_the_admins_alone_and_says_so():
    with pytest.raises(Forbidden, match="production") as refused:
        authorize(_principal(Role.OPERATOR), Action.DEPLOYMENT_WRITE, environment="production")
    assert "operator" in str(refused.value)


def test_approving_is_not_bound_to_an_environment():
    for role in (Role.ADMIN, Role.APPROVER):
        authorize(_principal(role), Action.DEPLOYMENT_APPROVE, environment="production")


def _missing_tenant_message(tenant_id: str) -> str:
    # What the tasks answer for a tenant that does not exist (tasks/deployments.py and others).
    return str(NotFoundError(f"tenant {tenant_id!r} does not exist"))


def test_a_tenant_owner_reads_and_configures_its_own_tenant():
    owner = _principal(Role.TENANT_OWNER)
    for action in (
        Action.TENANT_READ,
        Action.WORKFLOW_READ,
        Action.DEPLOYMENT_READ,
        Action.TENANT_PLUGIN_WRITE,
    ):
        authorize(owner, action, tenant_id=OWN)


@pytest.mark.parametrize("action", list(Action))
def test_another_tenant_is_not_found_whatever_the_action(action):
    owner = _principal(Role.TENANT_OWNER)
    with pytest.raises(NotVisible) as hidden:
        authorize(owner, action, tenant_id=OTHER, environment="development")
    assert isinstance(hidden.value, NotFoundError)
    assert hidden.value.code == "not_found"
    assert str(hidden.value) == _missing_tenant_message(OTHER)
    assert hidden.value.to_dict() == NotFoundError(_missing_tenant_message(OTHER)).to_dict()


def test_a_tenant_owner_may_not_change_its_own_tenant():
    owner = _principal(Role.TENANT_OWNER)
    for action in (Action.TENANT_WRITE, Action.DEPLOYMENT_WRITE, Action.DEPLOYMENT_APPROVE):
        with pytest.raises(Forbidden):
            authorize(owner, action, tenant_id=OWN, environment="development")


def test_a_tenant_owner_lists_only_its_tenants_and_writes_only_on_one():
    owner = Principal(subject="o", role=Role.TENANT_OWNER, tenants=frozenset({OWN, "initech"}))
    authorize(owner, Action.TENANT_READ)  # a listing, scoped by visible_tenants
    assert visible_tenants(owner) == frozenset({OWN, "initech"})
    with pytest.raises(Forbidden, match="only on a tenant it owns"):
        authorize(owner, Action.TENANT_PLUGIN_WRITE)


def test_a_tenant_owner_of_nothing_sees_nothing():
    owner = Principal(subject="o", role=Role.TENANT_OWNER, tenants=frozenset())
    assert visible_tenants(owner) == frozenset()
    with pytest.raises(NotVisible):
        authorize(owner, Action.TENANT_READ, tenant_id=OWN)


@pytest.mark.parametrize("role", [r for r in Role if r is not Role.TENANT_OWNER])
def test_every_other_role_sees_every_tenant(role):
    assert visible_tenants(_principal(role)) is None
