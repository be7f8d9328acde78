"""Chaos: the worker carrying a deployment is SIGKILLed mid-pause and mid-stage.

Default clocks for recovery (owner timeout 10 s, reconcile every few seconds): the
deployment must resume at the stage it stopped in and finish with one set of new
instances, none left over from the killed worker, while HAProxy keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import build_stack, teardown_stack
from tests.integration.test_deployments import (
    _need_haproxy,
    deploy,
    instances,
    make_tenant,
    row,
    running_names,
    wait_status,
    weights,
)
from tests.loadgen import LoadGenerator
from tests.stack import Stack
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def kill_stack(tmp_path) -> Iterator[Stack]:  # noqa: ANN001
    _need_haproxy()
    stack = build_stack("embedded", tmp_path / "kills")
    stack.extra_env.update(CUL8ER_RECONCILE_INTERVAL="1", CUL8ER_OWNER_TIMEOUT="6")
    try:
        stack.start_haproxy()
        stack.start_beat()
        yield stack
    finally:
        teardown_stack(stack)


def _timeline_events(stack: Stack, deployment_id: str) -> list[str]:
    return [f"{e['event']}:{e.get('stage', '')}" for e in row(stack, deployment_id).timeline]


def _finish_after_kill(stack: Stack, tenant: str, deployment_id: str, entry: str) -> None:
    """After the kill: a new worker finishes it; one set of new instances, none left over."""
    restarted = time.monotonic()
    with LoadGenerator(f"http://{entry}/", rate=20) as load:
        stack.start_worker("after", concurrency=2)
        dep = wait_status(stack, deployment_id, "succeeded", "rolled_back", timeout=120)
        took = time.monotonic() - restarted
    assert dep.status == "succeeded", dep.reason
    assert weights(dep) == [10, 30, 50, 70, 90, 100]
    # Each stage done once, in order: the delivery after the kill resumed where it stopped
    done = [e["stage"] for e in dep.timeline if e["event"] == "stage_done"]
    assert done == [s["name"] for s in dep.stages]
    rows = instances(stack, tenant)
    assert [(r.role, r.release) for r in rows] == [("app", "2"), ("app", "2")]
    assert running_names(stack, tenant) == {r.name for r in rows}
    assert load.failures == [], load.failures[:5]
    print(f"resumed and finished {took:.1f} s after the new worker was started")


def test_a_worker_killed_during_a_canary_pause_resumes_the_deployment(kill_stack: Stack) -> None:
    worker = kill_stack.start_worker("first", concurrency=2)
    entry = make_tenant(kill_stack, "kill-pause")
    # Pauses of 3 s wait in the ledger (longer than a step sleeps inline)
    result = deploy(
        kill_stack, "kill-pause", "2", "canary", {"interval_seconds": 3, "analysis": None}
    )
    deployment_id = result["deployment_id"]
    wait_until(
        lambda: "stage_done:weight-30" in _timeline_events(kill_stack, deployment_id),
        timeout=60,
        interval=0.1,
    )
    kill_stack.kill(worker)
    _finish_after_kill(kill_stack, "kill-pause", deployment_id, entry)


def test_a_worker_killed_right_after_a_weight_change_resumes_the_deployment(
    kill_stack: Stack,
) -> None:
    worker = kill_stack.start_worker("first", concurrency=2)
    entry = make_tenant(kill_stack, "kill-weight")
    # Short pauses and gates run inline: the step is running when the worker dies
    result = deploy(
        kill_stack,
        "kill-weight",
        "2",
        "canary",
        {"interval_seconds": 0.5, "analysis": {"interval_seconds": 0.3, "count": 1, "probes": 2}},
    )
    deployment_id = result["deployment_id"]
    wait_until(
        lambda: "stage_done:weight-30" in _timeline_events(kill_stack, deployment_id),
        timeout=60,
        interval=0.02,
    )
    kill_stack.kill(worker)
    _finish_after_kill(kill_stack, "kill-weight", deployment_id, entry)
