"""The same canary on the real Docker engine and the real Incus daemon, through HAProxy.

Release images ``cul8er/instance:v1`` / ``:v2`` (Docker) and ``cul8er-instance-v1`` / ``-v2``
(Incus) are built by scripts/platforms-up.sh; each serves its version at ``/version``.
Skipped with a reason when an engine is absent locally; CI starts both and fails these
tests if they cannot run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import build_stack, teardown_stack
from tests.integration.test_deployments import (
    _need_haproxy,
    instances,
    make_tenant,
    row,
    wait_status,
    weights,
)
from tests.integration.test_platforms import docker_client, incus_client
from tests.loadgen import LoadGenerator
from tests.stack import Stack

pytestmark = pytest.mark.integration

ARTIFACTS = {
    "docker": {"v1": "cul8er/instance:v1", "v2": "cul8er/instance:v2"},
    "incus": {"v1": "cul8er-instance-v1", "v2": "cul8er-instance-v2"},
}
CANARY = {
    "interval_seconds": 0.5,
    "analysis": {"interval_seconds": 0.5, "count": 2, "probes": 3},
}


@pytest.fixture(params=["docker", "incus"])
def engine_stack(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Stack]:  # noqa: ANN001
    platform = request.param
    _need_haproxy()
    if platform == "docker":
        client = docker_client()
        for image in ARTIFACTS["docker"].values():
            client.images.get(image)
    else:
        client = incus_client()
        for alias in ARTIFACTS["incus"].values():
            client.images.get_by_alias(alias)
    stack = build_stack("embedded", tmp_path_factory.mktemp(f"deploy-{platform}"))
    stack.extra_env.update(
        CUL8ER_DEFAULT_PLATFORM=platform,
        CUL8ER_HEALTH_WINDOW="60",
        CUL8ER_STEP_TIME_LIMIT="300",
    )
    try:
        stack.start_haproxy()
        stack.start_worker("p1", concurrency=3)
        stack.start_beat()
        yield stack
    finally:
        teardown_stack(stack)


def _deploy(stack: Stack, tenant: str, platform: str, version: str, config: dict) -> str:  # type: ignore[type-arg]
    result = stack.call(
        "cul8er.deployments.create",
        tenant_id=tenant,
        release={"version": version, "artifacts": {platform: ARTIFACTS[platform][version]}},
        strategy="canary" if config else "direct",
        strategy_config=config,
    )
    assert result["ok"], result
    return str(result["deployment_id"])


def test_the_same_canary_passes_on_the_engine(engine_stack: Stack) -> None:
    platform = engine_stack.extra_env["CUL8ER_DEFAULT_PLATFORM"]
    tenant = f"canary-{platform}"
    entry = make_tenant(engine_stack, tenant, plan="duo")
    first = _deploy(engine_stack, tenant, platform, "v1", {})
    assert wait_status(engine_stack, first, "succeeded", "rolled_back", timeout=300).status == (
        "succeeded"
    )
    with LoadGenerator(f"http://{entry}/version", rate=20) as load:
        deployment_id = _deploy(engine_stack, tenant, platform, "v2", CANARY)
        dep = wait_status(engine_stack, deployment_id, "succeeded", "rolled_back", timeout=300)
        time.sleep(0.5)
    assert dep.status == "succeeded", dep.reason
    assert weights(row(engine_stack, deployment_id)) == [10, 30, 50, 70, 90, 100]
    assert load.failures == [], load.failures[:5]
    assert {"v1", "v2"} <= set(load.by_version()), load.by_version()
    rows = instances(engine_stack, tenant)
    assert [(r.role, r.release, r.platform) for r in rows] == [("app", "v2", platform)] * 2
