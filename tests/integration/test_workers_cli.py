"""`cul8er workers` and `cul8er workflow show`: who runs each step, who died, who took over."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select

from schemas.states import StepStatus
from tests.stack import ROOT, Stack
from workers.runtime.models import StepRun
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration

CREATE = "cul8er.tenants.create_instances"
#: Short liveness clocks: a silent owner is noticed in seconds.
LIVENESS = {"CUL8ER_OWNER_TIMEOUT": "4", "CUL8ER_HEARTBEAT_INTERVAL": "1"}


def cli(stack: Stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real `cul8er` command line, with the stack's settings and a wide terminal."""
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *args],
        env={**stack.env, "COLUMNS": "250"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


def listed(stack: Stack, *args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(cli(stack, "workers", "--json", *args).stdout)
    return rows


def of_node(rows: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["node"].startswith(f"{prefix}-")]


def wait_step_running(stack: Stack, run_id: str, name: str, timeout: float = 30) -> None:
    def running() -> bool:
        with stack.session() as session:
            status = session.scalars(
                select(StepRun.status).where(StepRun.run_id == run_id, StepRun.name == name)
            ).first()
        return status == StepStatus.RUNNING

    wait_until(running, timeout=timeout, message=f"{name} never started", error=AssertionError)


def wait_states(
    stack: Stack, prefix: str, states: set[str], timeout: float = 30
) -> list[dict[str, Any]]:
    """Poll `cul8er workers --json` until every process of the node is in one of ``states``."""
    seen: list[list[dict[str, Any]]] = []

    def settled() -> list[dict[str, Any]] | None:
        seen.append(of_node(listed(stack), prefix))
        rows = seen[-1]
        return rows if rows and all(r["state"] in states for r in rows) else None

    return wait_until(
        settled, timeout=timeout, interval=0.5, message=lambda: str(seen[-1]), error=AssertionError
    )


def provision(stack: Stack, tenant_id: str) -> str:
    created = stack.call(
        "cul8er.tenants.create", name=f"Co {tenant_id}", plan="slowboot", tenant_id=tenant_id
    )
    assert created["ok"], created
    return str(created["workflow_id"])


def deprovision(stack: Stack, tenant_id: str) -> None:
    gone = stack.call("cul8er.tenants.deprovision", tenant_id=tenant_id)
    assert stack.wait_run(gone["workflow_id"])["status"] == "succeeded"


def test_workers_lists_pool_processes_what_they_hold_and_when_they_die(
    stack_factory,
) -> None:
    stack = stack_factory("embedded")
    stack.extra_env.update(LIVENESS)
    # Given a worker with two pool processes, and beat
    worker = stack.start_worker("w1", concurrency=2)
    stack.start_beat()

    # When `cul8er workers --json` runs
    rows = wait_states(stack, "w1", {"alive"})
    # Then it lists both pool processes, alive, under the worker's node name, holding nothing
    assert len(rows) == 2, rows
    assert len({r["pid"] for r in rows}) == 2 and len({r["boot_id"] for r in rows}) == 2
    assert all("@" in r["node"] and r["age_seconds"] < 4 and r["holds"] == [] for r in rows)
    node = rows[0]["node"]
    assert {r["node"] for r in rows} == {node}

    # Given a provision whose create_instances takes seconds
    tenant_id = f"t{uuid.uuid4().hex[:8]}"
    run_id = provision(stack, tenant_id)
    wait_step_running(stack, run_id, CREATE)
    # When the workers are listed while the step runs (both forms at once: it runs ~4 s)
    with ThreadPoolExecutor(2) as pool:
        as_json = pool.submit(listed, stack)
        human = pool.submit(cli, stack, "workers").result().stdout
        rows = of_node(as_json.result(), "w1")
    # Then exactly one process holds it, with its tenant and attempt
    holding = [r for r in rows if r["holds"]]
    assert len(holding) == 1, rows
    (held,) = holding[0]["holds"]
    assert held["workflow_id"] == run_id and held["step"] == CREATE
    assert held["tenant_id"] == tenant_id and held["attempts"] == 1 and held["heartbeat_at"]
    # and the table shows the short workflow id and step name beside the node
    assert node in human and f"{run_id[:8]} create_instances" in human and "alive" in human

    # When the run has finished
    run = stack.wait_run(run_id, timeout=90)
    assert run["status"] == "succeeded", run
    shown = cli(stack, "workflow", "show", run_id).stdout
    # Then `workflow show` names the process that ran each finished step
    step = next(s for s in run["steps"] if s["name"] == CREATE)
    assert step["owner"]["node"] == node and step["owner"]["pid"] == holding[0]["pid"]
    assert f"{node} pid {holding[0]['pid']}" in shown
    assert step["takeovers"] == [] and "history:" not in shown  # nothing happened to it
    deprovision(stack, tenant_id)
    assert all(r["holds"] == [] for r in of_node(listed(stack), "w1"))

    # When the whole worker is SIGKILLed
    stack.kill(worker)
    # Then its processes stop counting as alive once the owner timeout passes: silent, as
    # no worker is left to run reconcile and mark them lost
    silent = wait_states(stack, "w1", {"silent", "lost"})
    assert all(r["state"] == "silent" for r in silent), silent
    assert all(r["age_seconds"] > 4 and r["lost_at"] is None for r in silent)
    assert all(r["stopped_at"] is None for r in silent)
    assert "silent" in cli(stack, "workers").stdout


def test_takeover_of_a_killed_owners_step_shows_in_workflow_show(stack_factory) -> None:
    stack = stack_factory("embedded")
    stack.extra_env.update(LIVENESS)
    # Given a one-process worker running create_instances of a provision, and beat
    doomed = stack.start_worker("doomed", concurrency=1)
    stack.start_beat()
    tenant_id = f"t{uuid.uuid4().hex[:8]}"
    run_id = provision(stack, tenant_id)
    wait_step_running(stack, run_id, CREATE)
    (victim,) = of_node(listed(stack), "doomed")
    assert [h["step"] for h in victim["holds"]] == [CREATE]

    # When that worker is SIGKILLed mid-step and another worker starts
    stack.kill(doomed)
    stack.start_worker("heir", concurrency=2)

    # Then the run finishes on the heir
    run = stack.wait_run(run_id, timeout=120)
    assert run["status"] == "succeeded", run
    view = json.loads(cli(stack, "workflow", "show", run_id, "--json").stdout)
    step = next(s for s in view["steps"] if s["name"] == CREATE)
    assert step["attempts"] == 2 and step["owner"]["node"].startswith("heir-")
    # with exactly one takeover, naming the owner it took the step from
    (takeover,) = step["takeovers"]
    # its process is gone and this is its host: known dead without waiting for the timeout
    assert takeover["reason"] == "owner_exited" and takeover["attempt"] == 1
    assert takeover["previous_owner"] == {
        "boot_id": victim["boot_id"],
        "node": victim["node"],
        "pid": victim["pid"],
    }
    assert takeover["silent_for"] >= 0 and takeover["by"] in ("reconcile", "delivery")
    assert takeover in step["history"]
    # and the human output shows the takeover in the table and in the history lines
    shown = cli(stack, "workflow", "show", run_id).stdout
    assert f"1 (owner_exited {takeover['silent_for']:.1f}s, from {victim['node']}" in shown
    history = [line for line in shown.splitlines() if " takeover " in line]
    assert len(history) == 1, shown
    assert "reason=owner_exited" in history[0] and victim["node"] in history[0]
    assert f"by={takeover['by']}" in history[0] and "create_instances" in history[0]
    # and `cul8er workers` shows the dead process lost, the heir's processes alive
    (gone,) = wait_states(stack, "doomed", {"lost"})
    assert gone["boot_id"] == victim["boot_id"] and gone["holds"] == []
    assert all(r["state"] == "alive" for r in of_node(listed(stack), "heir"))

    deprovision(stack, tenant_id)
