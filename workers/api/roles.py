"""Who may do what through the API: roles, actions and the one policy table.

A token names one role (and, for a tenant owner, the tenants it owns). Every route names the
action it performs and, where it is about one tenant, that tenant; deployment writes also name
the target environment. ``authorize`` answers with nothing or raises:

- ``Forbidden`` (403): the role may not perform the action (or not in that environment);
- ``NotVisible`` (404): a tenant owner asked about a tenant it does not own. The answer is the
  one a missing tenant gets, word for word, so a token never learns which other tenants exist.

Listings are scoped with ``visible_tenants``: ``None`` is every tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from schemas.states import Environment
from workers.runtime.errors import NotFoundError, PermanentError

__all__ = [
    "Action",
    "Forbidden",
    "NotVisible",
    "POLICY",
    "Principal",
    "READS",
    "Role",
    "authorize",
    "visible_tenants",
]


class Role(StrEnum):
    """The roles of the product spec; a token carries exactly one."""

    ADMIN = "admin"
    OPERATOR = "operator"
    APPROVER = "approver"
    TENANT_OWNER = "tenant_owner"
    PLUGIN_DEVELOPER = "plugin_developer"
    BILLING = "billing"
    VIEWER = "viewer"


class Action(StrEnum):
    """What a route does, coarse enough that the whole policy fits in one table."""

    #: Get and list tenants, and a tenant's plugin versions.
    TENANT_READ = "tenant_read"
    #: Create, change plan, suspend, resume, delete.
    TENANT_WRITE = "tenant_write"
    WORKFLOW_READ = "workflow_read"
    DEPLOYMENT_READ = "deployment_read"
    #: Create, promote, pause, resume, abort, retry, rollback (environment rules apply).
    DEPLOYMENT_WRITE = "deployment_write"
    #: Approve or reject.
    DEPLOYMENT_APPROVE = "deployment_approve"
    #: The plugin catalogue: list, info, search.
    PLUGIN_READ = "plugin_read"
    PLUGIN_INSTALL = "plugin_install"
    #: Enable, disable, reload.
    PLUGIN_ADMIN = "plugin_admin"
    #: A tenant's plugin version and config.
    TENANT_PLUGIN_WRITE = "tenant_plugin_write"
    #: Usage, invoices, autoscale decisions.
    USAGE_READ = "usage_read"
    #: Payment events.
    BILLING_WRITE = "billing_write"
    AUDIT_READ = "audit_read"


@dataclass(frozen=True)
class Principal:
    """The caller a verified token stands for."""

    subject: str
    role: Role
    #: The tenants a tenant owner owns; empty for every other role.
    tenants: frozenset[str] = frozenset()


_A = Action
#: Every read action.
READS: Final = frozenset(
    {
        _A.TENANT_READ,
        _A.WORKFLOW_READ,
        _A.DEPLOYMENT_READ,
        _A.PLUGIN_READ,
        _A.USAGE_READ,
        _A.AUDIT_READ,
    }
)

#: The whole policy: what each role may do at all. The rules below ``authorize`` narrow it:
#: production deployments are the admin's alone, a plugin developer deploys plugins to
#: development and qa only, and a tenant owner sees only its own tenants.
POLICY: Final[dict[Role, frozenset[Action]]] = {
    Role.ADMIN: frozenset(Action),
    Role.OPERATOR: READS | {_A.TENANT_WRITE, _A.DEPLOYMENT_WRITE},
    Role.APPROVER: frozenset(
        {_A.DEPLOYMENT_APPROVE, _A.TENANT_READ, _A.WORKFLOW_READ, _A.DEPLOYMENT_READ}
    ),
    Role.TENANT_OWNER: frozenset(
        {_A.TENANT_READ, _A.WORKFLOW_READ, _A.DEPLOYMENT_READ, _A.TENANT_PLUGIN_WRITE}
    ),
    Role.PLUGIN_DEVELOPER: frozenset(
        {_A.PLUGIN_INSTALL, _A.PLUGIN_READ, _A.DEPLOYMENT_READ, _A.DEPLOYMENT_WRITE}
    ),
    Role.BILLING: frozenset({_A.USAGE_READ, _A.BILLING_WRITE, _A.TENANT_READ}),
    Role.VIEWER: READS,
}

#: Where a plugin developer may deploy (plugin deployments only).
PLUGIN_DEVELOPER_ENVIRONMENTS: Final = frozenset({Environment.DEVELOPMENT, Environment.QA})


class Forbidden(PermanentError):
    """The role may not perform the action (HTTP 403)."""

    code = "forbidden"

    def __init__(self, message: str, *, role: Role, action: Action) -> None:
        super().__init__(message)
        self.role = role
        self.action = action


class NotVisible(NotFoundError):
    """A tenant owner asked about another tenant: answered exactly as a missing tenant (404)."""

    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"tenant {tenant_id!r} does not exist")
        self.tenant_id = tenant_id


def visible_tenants(principal: Principal) -> frozenset[str] | None:
    """The tenants the principal may see: ``None`` is all of them."""
    if principal.role is Role.TENANT_OWNER:
        return principal.tenants
    return None


def authorize(
    principal: Principal,
    action: Action,
    *,
    tenant_id: str | None = None,
    environment: str | None = None,
    plugin_deployment: bool = False,
) -> None:
    """Return if ``principal`` may perform ``action``; raise ``NotVisible`` or ``Forbidden``.

    ``tenant_id`` is the tenant the request is about (``None`` for a listing, which the caller
    scopes with ``visible_tenants``, or for what belongs to no tenant). ``environment`` is the
    target environment of a deployment write; a role other than admin is refused one without
    it. ``plugin_deployment`` says the deployment rolls a plugin version out.
    """
    role = principal.role
    if role is Role.TENANT_OWNER and tenant_id is not None and tenant_id not in principal.tenants:
        raise NotVisible(tenant_id)
    if action not in POLICY[role]:
        raise Forbidden(
            f"role {role.value!r} may not perform {action.value!r}", role=role, action=action
        )
    if role is Role.TENANT_OWNER and tenant_id is None and action not in READS:
        raise Forbidden(
            f"role {role.value!r} may perform {action.value!r} only on a tenant it owns",
            role=role,
            action=action,
        )
    if action is Action.DEPLOYMENT_WRITE:
        _check_environment(role, environment, plugin_deployment=plugin_deployment)


def _check_environment(role: Role, environment: str | None, *, plugin_deployment: bool) -> None:
    """The environment rules of a deployment write (the table already allowed the role)."""
    if role is Role.ADMIN:
        return
    action = Action.DEPLOYMENT_WRITE
    if environment is None:
        raise Forbidden(
            f"role {role.value!r} may perform {action.value!r} only on a known target environment",
            role=role,
            action=action,
        )
    if environment == Environment.PRODUCTION:
        raise Forbidden(
            f"role {role.value!r} may not deploy to production (admin only)",
            role=role,
            action=action,
        )
    if role is Role.PLUGIN_DEVELOPER and not plugin_deployment:
        raise Forbidden(
            f"role {role.value!r} may deploy plugins only, not releases", role=role, action=action
        )
    if role is Role.PLUGIN_DEVELOPER and environment not in PLUGIN_DEVELOPER_ENVIRONMENTS:
        raise Forbidden(
            f"role {role.value!r} may deploy to development and qa only, not {environment!r}",
            role=role,
            action=action,
        )
