"""Owners on real workers: a slow step is never taken over, a frozen one is, and safely."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.stack import Stack, instance_processes
from workers.runtime.models import Instance

pytestmark = pytest.mark.integration

CREATE = "cul8er.tenants.create_instances"


def _log_events(data_dir: Path, event: str) -> list[dict]:
    """JSON log lines of every process of the stack whose event is ``event``."""
    found = []
    for path in data_dir.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if f'"{event}"' not in line:
                continue
            try:
                record = json.loads(line[line.index("{") :])
            except ValueError:
                continue
            if record.get("event") == event:
                found.append(record)
    return found


def _deprovision(stack: Stack, tenant_id: str) -> None:
    gone = stack.call("cul8er.tenants.deprovision", tenant_id=tenant_id)
    assert stack.wait_run(gone["workflow_id"])["status"] == "succeeded"


@pytest.mark.timeout(300)
def test_a_90_second_step_on_a_live_worker_is_never_taken_over(stack_factory) -> None:
    stack = stack_factory("redis-postgres")
    # Default owner timeout (10 s), a step limit long enough for the slow platform
    stack.extra_env.update(CUL8ER_STEP_TIME_LIMIT="300", CUL8ER_INSTANCE_START_TIMEOUT="150")
    stack.start_worker("w1", concurrency=2)
    stack.start_worker("w2", concurrency=2)
    stack.start_beat()
    # Given a provision whose instance takes 90 s to start listening
    tenant_id = f"t{uuid.uuid4().hex[:8]}"
    created = stack.call("cul8er.tenants.create", name="Slow", plan="glacial", tenant_id=tenant_id)
    run_id = created["workflow_id"]
    holder = stack.wait_step_running(run_id, CREATE)
    started = time.monotonic()
    # When it runs for 90 s, with a second worker and reconcile looking every second
    run = stack.wait_run(run_id, timeout=200)
    elapsed = time.monotonic() - started
    print(f"\nslow step ran {elapsed:.1f} s on one owner")
    # Then it ran once, on its first owner, and nobody took it over
    assert run["status"] == "succeeded", run
    assert elapsed > 85
    step = next(s for s in run["steps"] if s["name"] == CREATE)
    assert step["attempts"] == 1 and step["takeovers"] == []
    assert step["owner"]["boot_id"] == holder.owner_id
    assert _log_events(stack.data_dir, "step_taken_over") == []
    # though the broker did redeliver its message past the visibility timeout, and that
    # copy stepped aside for the live owner
    skipped = [
        e
        for e in _log_events(stack.data_dir, "step_skipped")
        if e.get("workflow_id") == run_id and e.get("step") == CREATE
    ]
    assert skipped and {e["outcome"] for e in skipped} == {"busy"}
    assert len(instance_processes(stack.data_dir, f"t-{tenant_id}-app-0")) == 1
    _deprovision(stack, tenant_id)


@pytest.mark.timeout(300)
def test_a_frozen_worker_is_taken_over_and_its_late_completion_refused(stack_factory) -> None:
    stack = stack_factory("redis-postgres")
    # Step limits far longer than the freeze: only the owner timeout can free the step
    stack.extra_env.update(CUL8ER_STEP_TIME_LIMIT="300")
    stack.start_worker("w1", concurrency=1)
    stack.start_worker("w2", concurrency=1)
    stack.start_beat()
    tenant_id = f"t{uuid.uuid4().hex[:8]}"
    name = f"t-{tenant_id}-app-0"
    created = stack.call("cul8er.tenants.create", name="Ice", plan="slowboot", tenant_id=tenant_id)
    run_id = created["workflow_id"]
    # Given the worker running create_instances, its instance spawned and booting (4 s)
    holder = stack.wait_step_running(run_id, CREATE)
    frozen, child_pid = stack.worker_of(holder.owner_id)
    time.sleep(0.5)
    # When that whole worker is frozen (SIGSTOP, alive but silent) for 20 s
    os.killpg(frozen.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        # Then the other worker takes the step over after the owner timeout and finishes
        run = stack.wait_run(run_id, timeout=19)
        assert run["status"] == "succeeded", json.dumps(run["steps"], indent=1)
        took = time.monotonic() - frozen_at
        print(f"\nrun finished {took:.1f} s after the freeze")
        time.sleep(max(0.0, 20 - (time.monotonic() - frozen_at)))
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    # When the frozen worker wakes, its late completion is refused by the ledger
    deadline = time.monotonic() + 30
    while True:
        step = stack.step_row(run_id, CREATE)
        events = [h["event"] for h in step.history or []]
        if "late_completion_refused" in events or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert events == ["takeover", "late_completion_refused"], step.history
    takeover = step.history[0]
    assert takeover["reason"] == "owner_silent"
    assert takeover["previous_owner"]["pid"] == child_pid
    assert takeover["silent_for"] >= 10
    assert step.attempts == 2 and step.owner_id != holder.owner_id and step.status == "done"
    refused = [
        e for e in _log_events(stack.data_dir, "step_completion_refused") if e["step"] == CREATE
    ]
    assert len(refused) == 1 and refused[0]["attempt"] == 1
    # and causes no second side effect: one instance process, one row, later steps ran once
    assert len(instance_processes(stack.data_dir, name)) == 1
    with stack.session() as session:
        count = session.scalar(
            select(func.count()).select_from(Instance).where(Instance.tenant_id == tenant_id)
        )
    assert count == 1
    view = stack.wait_run(run_id)
    assert view["status"] == "succeeded"
    assert all(s["attempts"] == 1 for s in view["steps"] if s["name"] != CREATE)
    _deprovision(stack, tenant_id)
    assert instance_processes(stack.data_dir) == []
