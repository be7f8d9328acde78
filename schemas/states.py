"""The statuses of tenants, workflow runs and their steps, as stored and as answered.

Each is a :class:`~enum.StrEnum`: a member compares equal to its value, so rows read back
from the database (plain strings) and JSON answers need no conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final

__all__ = [
    "DEPLOYMENT_FINAL",
    "DEPLOYMENT_OPEN",
    "DeploymentStatus",
    "Environment",
    "FINAL_RUN",
    "FINISHED",
    "PHASE_STATUS",
    "PaymentStatus",
    "Phase",
    "RunStatus",
    "StepStatus",
    "TenantStatus",
]


class TenantStatus(StrEnum):
    """provisioning → active ⇄ suspended → deprovisioning → terminated (failed: create failed)."""

    PROVISIONING = "provisioning"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DEPROVISIONING = "deprovisioning"
    TERMINATED = "terminated"
    FAILED = "failed"


class RunStatus(StrEnum):
    """running → succeeded | compensating → failed."""

    RUNNING = "running"
    COMPENSATING = "compensating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class StepStatus(StrEnum):
    """pending → running → done | failed, with a pause in between after a transient error.

    ``retrying``: a short countdown message is on its way in the broker; ``waiting``: a
    longer wait kept in the ledger, which the beat tick dispatches once it is due.
    """

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"


class DeploymentStatus(StrEnum):
    """A deployment: ``pending → awaiting_approval → progressing ⇄ paused →`` an end."""

    PENDING = "pending"
    AWAITING_APPROVAL = "awaiting_approval"
    PROGRESSING = "progressing"
    PAUSED = "paused"
    #: Rolling back: traffic is on the stable release, the new instances are going.
    ROLLING_BACK = "rolling_back"
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"


class Environment(StrEnum):
    """Where a tenant stands in the release path; production waits for approvals."""

    DEVELOPMENT = "development"
    QA = "qa"
    PRODUCTION = "production"


class PaymentStatus(StrEnum):
    """A tenant's payment record: ok → failed (a grace period runs) → suspended; ok once paid."""

    OK = "ok"
    FAILED = "failed"
    SUSPENDED = "suspended"


class Phase(StrEnum):
    """The direction a run moves in."""

    #: The phase that does the work.
    FORWARD = "forward"
    #: The phase that undoes completed steps, in reverse, after a failure.
    COMPENSATE = "compensate"


#: Step states after which a row never changes again.
FINISHED: Final = (StepStatus.DONE, StepStatus.FAILED)
#: Run states after which a run never changes again.
FINAL_RUN: Final = (RunStatus.SUCCEEDED, RunStatus.FAILED)
#: The run status that each phase runs under.
#: A deployment in one of these holds its tenant: a second one is refused.
DEPLOYMENT_OPEN: Final = (
    DeploymentStatus.PENDING,
    DeploymentStatus.AWAITING_APPROVAL,
    DeploymentStatus.PROGRESSING,
    DeploymentStatus.PAUSED,
    DeploymentStatus.ROLLING_BACK,
)

#: Statuses a deployment does not leave (``retry`` starts it again from some of them).
DEPLOYMENT_FINAL: Final = (
    DeploymentStatus.SUCCEEDED,
    DeploymentStatus.ABORTED,
    DeploymentStatus.ROLLED_BACK,
    DeploymentStatus.FAILED,
    DeploymentStatus.REJECTED,
    DeploymentStatus.EXPIRED,
)

PHASE_STATUS: Final[Mapping[str, RunStatus]] = {
    Phase.FORWARD: RunStatus.RUNNING,
    Phase.COMPENSATE: RunStatus.COMPENSATING,
}
