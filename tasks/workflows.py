"""Every tenant workflow, declared once: ordered steps and what undoes each.

See docs/architecture.md §3 (the machinery) and §6 (these workflows).
"""

from __future__ import annotations

from workers.engine.workflow import Step, Workflow, workflows

__all__ = ["CHANGE_PLAN", "DEPLOYMENT", "DEPROVISION", "PROVISION", "RESUME", "SUSPEND"]

#: Sign-up: subnet → instances → limits → data store → health → entry point → active.
PROVISION = Workflow(
    kind="tenant.provision",
    steps=(
        Step("cul8er.tenants.allocate_network", compensate="cul8er.tenants.release_network"),
        Step("cul8er.tenants.create_instances", compensate="cul8er.tenants.destroy_instances"),
        Step("cul8er.tenants.apply_limits"),
        Step("cul8er.tenants.create_datastore", compensate="cul8er.tenants.drop_datastore"),
        Step("cul8er.tenants.health_check"),
        Step("cul8er.tenants.sync_entry", compensate="cul8er.tenants.remove_entry"),
        Step("cul8er.tenants.activate"),
    ),
    on_failure=("cul8er.tenants.mark_failed",),
)

#: Scale up or down: new limits live on every instance, health, then the plan is committed.
CHANGE_PLAN = Workflow(
    kind="tenant.change_plan",
    steps=(
        Step("cul8er.tenants.apply_limits", compensate="cul8er.tenants.restore_limits"),
        Step("cul8er.tenants.health_check"),
        Step("cul8er.tenants.sync_entry"),
        Step("cul8er.tenants.commit_plan"),
    ),
    on_failure=("cul8er.tenants.release_tenant",),
)

#: Stop the instances (data kept).
SUSPEND = Workflow(
    kind="tenant.suspend",
    steps=(
        Step("cul8er.tenants.stop_instances", compensate="cul8er.tenants.start_instances"),
        Step("cul8er.tenants.sync_entry"),
        Step("cul8er.tenants.mark_suspended"),
    ),
    on_failure=("cul8er.tenants.release_tenant",),
)

#: Start the instances again and check them.
RESUME = Workflow(
    kind="tenant.resume",
    steps=(
        Step("cul8er.tenants.start_instances", compensate="cul8er.tenants.stop_instances"),
        Step("cul8er.tenants.health_check"),
        Step("cul8er.tenants.sync_entry"),
        Step("cul8er.tenants.mark_active"),
    ),
    on_failure=("cul8er.tenants.release_tenant",),
)

#: Remove everything of the tenant and free its subnet; nothing here can be undone.
DEPROVISION = Workflow(
    kind="tenant.deprovision",
    steps=(
        Step("cul8er.tenants.remove_entry"),
        Step("cul8er.tenants.destroy_instances"),
        Step("cul8er.tenants.drop_datastore"),
        Step("cul8er.tenants.release_network"),
        Step("cul8er.tenants.mark_terminated"),
    ),
    on_failure=("cul8er.tenants.mark_failed",),
)

#: A release rolled over the tenant's instances by a strategy (docs/architecture.md §10):
#: one step runs every stage; a failed gate, an abort or a stage that gives up rolls back.
DEPLOYMENT = Workflow(
    kind="deployment",
    steps=(Step("cul8er.deployments.advance"),),
    on_failure=("cul8er.deployments.roll_back",),
)

workflows(PROVISION, CHANGE_PLAN, SUSPEND, RESUME, DEPROVISION, DEPLOYMENT)
