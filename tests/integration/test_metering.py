"""Metering on a real worker and a real beat (2 s windows), against real local instances.

A tenant that burns CPU accumulates cpu-second rows window after window, and their sum is
the instance process tree's own CPU time (psutil). With two beats and every metering message
also sent twice at once, no usage row is written twice and no usage is counted twice.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from sqlalchemy import func, select

from schemas.states import RunStatus
from tests.conftest import require, teardown_stack
from tests.stack import Stack, create_pg_database
from workers.economics import metering
from workers.runtime.models import Instance, UsageRecord, utcnow

pytestmark = pytest.mark.integration

#: Two-second windows, and the metering tasks on every worker (until TASK_MODULES has them).
METER_ENV = {"CUL8ER_METER_INTERVAL": "2", "CUL8ER_IMPORTS": '["tasks.metering"]'}
INTERVAL = 2
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def meter_stack(tmp_path: Path) -> Iterator[Callable[[str], Stack]]:
    """``make(kind)``: a stack on its own embedded Redis, over SQLite or PostgreSQL.

    Its own broker, rather than a numbered database of the shared Redis, so no other test run's
    workers can take (and drop) its metering messages.
    """
    made: list[Stack] = []

    def make(kind: str) -> Stack:
        data_dir = tmp_path / f"{kind}-{len(made)}"
        if kind == "postgres":
            require("postgres")
            url = create_pg_database()
        else:
            url = f"sqlite:///{data_dir / 'cul8er.db'}"
        stack = Stack(kind, data_dir, url, None, extra_env=dict(METER_ENV))
        made.append(stack)
        stack.prepare()
        return stack

    yield make
    for stack in made:
        teardown_stack(stack)


def get(endpoint: str, path: str) -> bytes:
    with OPENER.open(f"http://{endpoint}{path}", timeout=60) as response:
        body: bytes = response.read()
        return body


def create_tenant(stack: Stack) -> tuple[str, str, int]:
    """A provisioned free-plan tenant: its id, its instance's endpoint and pid."""
    tenant_id = f"m{uuid.uuid4().hex[:8]}"
    created = stack.call(
        "cul8er.tenants.create", name=f"Meter {tenant_id}", plan="free", tenant_id=tenant_id
    )
    assert created["ok"], created
    run = stack.wait_run(created["workflow_id"])
    assert run["status"] == RunStatus.SUCCEEDED, run
    with stack.session() as session:
        instance = session.scalars(select(Instance).where(Instance.tenant_id == tenant_id)).one()
        assert instance.endpoint is not None and instance.provider_id is not None
        return tenant_id, instance.endpoint, int(instance.provider_id)


def tree_cpu_seconds(pid: int) -> float:
    """The instance's own CPU time as psutil sees it: the process and its children."""
    proc = psutil.Process(pid)
    times = proc.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in proc.children(recursive=True):
        child_times = child.cpu_times()
        total += child_times.user + child_times.system
    return total


def cpu_rows(stack: Stack, tenant_id: str) -> dict[object, float]:
    with stack.session() as session:
        rows = session.execute(
            select(UsageRecord.window_start, UsageRecord.value).where(
                UsageRecord.tenant_id == tenant_id, UsageRecord.metric == "cpu_seconds"
            )
        )
        return {start: value for start, value in rows}


def wait_metered_after(stack: Stack, tenant_id: str, moment: object, timeout: float = 30) -> None:
    """Wait until a window starting at or after ``moment`` is metered (read after it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(start >= moment for start in cpu_rows(stack, tenant_id)):  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"no window after {moment} was metered; see {stack.data_dir}")


def burn(endpoint: str, rounds: int, seconds: float) -> None:
    for _ in range(rounds):
        get(endpoint, f"/burn?seconds={seconds}")
        time.sleep(INTERVAL * 0.75)


def assert_no_duplicate_rows(stack: Stack, tenant_id: str) -> None:
    with stack.session() as session:
        rows = session.scalar(
            select(func.count()).select_from(UsageRecord).where(UsageRecord.tenant_id == tenant_id)
        )
        keys = session.scalar(
            select(func.count()).select_from(
                select(UsageRecord.metric, UsageRecord.window_start)
                .where(UsageRecord.tenant_id == tenant_id)
                .distinct()
                .subquery()
            )
        )
        windows = session.scalar(
            select(func.count(UsageRecord.window_start.distinct())).where(
                UsageRecord.tenant_id == tenant_id
            )
        )
    assert rows == keys == windows * len(metering.AGGREGATIONS)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_busy_tenant_accumulates_cpu_rows_matching_its_own_cpu_time(
    meter_stack: Callable[[str], Stack], kind: str
) -> None:
    # Given a worker and a beat metering every 2 s, and a provisioned tenant
    stack = meter_stack(kind)
    stack.start_worker("meter", concurrency=2)
    stack.start_beat()
    tenant_id, endpoint, pid = create_tenant(stack)

    # When its instance burns CPU across several windows
    burn(endpoint, rounds=4, seconds=0.4)
    burned_until = utcnow()
    wait_metered_after(stack, tenant_id, burned_until)
    own_cpu = tree_cpu_seconds(pid)

    # Then it has a cpu-seconds row per window, several of them busy
    rows = cpu_rows(stack, tenant_id)
    assert len(rows) >= 4, rows
    assert sum(1 for value in rows.values() if value >= 0.1) >= 2, rows
    assert sum(rows.values()) >= 4 * 0.4
    # And their sum is the process tree's own CPU time, within 5 %
    assert sum(rows.values()) == pytest.approx(own_cpu, rel=0.05), (rows, own_cpu)
    # And every window has one row of each metric, each with its aggregation
    assert_no_duplicate_rows(stack, tenant_id)
    with stack.session() as session:
        aggregations = dict(
            session.execute(
                select(UsageRecord.metric, UsageRecord.aggregation)
                .where(UsageRecord.tenant_id == tenant_id)
                .distinct()
            ).all()
        )
        memory = session.scalars(
            select(UsageRecord.value).where(
                UsageRecord.tenant_id == tenant_id, UsageRecord.metric == "memory_bytes"
            )
        ).all()
    assert aggregations == metering.AGGREGATIONS
    assert min(memory) > 0  # the instance process's resident memory, every window

    # And meter_tenant meters one tenant on demand, answering like a public task
    answer = stack.call("cul8er.metering.meter_tenant", tenant_id=tenant_id)
    assert answer["ok"] and set(answer["usage"]) == set(metering.AGGREGATIONS), answer
    missing = stack.call("cul8er.metering.meter_tenant", tenant_id="nobody-here")
    assert missing["error"]["code"] == "not_found"
    bad = stack.call("cul8er.metering.meter_tenant", tenant_id=tenant_id, window_start="x")
    assert bad["error"]["code"] == "validation_error"


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_two_beats_and_every_message_twice_count_usage_once(
    meter_stack: Callable[[str], Stack], kind: str
) -> None:
    # Given two workers, two beats, and a provisioned tenant
    stack = meter_stack(kind)
    stack.start_worker("a", concurrency=2)
    stack.start_worker("b", concurrency=2)
    stack.start_beat()
    stack.start_beat()
    tenant_id, endpoint, pid = create_tenant(stack)
    client = stack.client
    sent: dict[str, list] = {"cul8er.metering.meter_all": [], "cul8er.metering.meter_tenants": []}

    def twice(task: str, **kwargs: object) -> None:
        for _ in range(2):
            sent[task].append(
                client.send_task(task, kwargs=kwargs, queue="metering", ignore_result=False)
            )

    # When, besides both beats, every window's fan-out and the tenant's chunk are each sent
    # twice at once, while the tenant burns CPU
    with ThreadPoolExecutor(max_workers=1) as pool:
        burning = pool.submit(burn, endpoint, 4, 0.4)
        while not burning.done():
            window = metering.window_for(INTERVAL)
            twice("cul8er.metering.meter_all")
            twice("cul8er.metering.meter_tenants", tenant_ids=[tenant_id], **window.to_json())
            time.sleep(INTERVAL / 2)
        burning.result()
    burned_until = utcnow()
    wait_metered_after(stack, tenant_id, burned_until)
    window = metering.window_for(INTERVAL)
    twice("cul8er.metering.meter_tenants", tenant_ids=[tenant_id], **window.to_json())
    answers = {task: [r.get(timeout=60) for r in results] for task, results in sent.items()}
    own_cpu = tree_cpu_seconds(pid)

    # Then every copy succeeded, and of the fan-outs of one slot exactly one went ahead
    assert all(a["ok"] for results in answers.values() for a in results), answers
    fanned: dict[str, int] = {}
    for answer in answers["cul8er.metering.meter_all"]:
        fanned.setdefault(answer["window_start"], 0)
        fanned[answer["window_start"]] += "skipped" not in answer
    assert max(fanned.values()) <= 1, fanned
    # And each tenant's chunk, sent twice per slot, wrote its window once
    written: dict[str, int] = {}
    for answer in answers["cul8er.metering.meter_tenants"]:
        written[answer["window_start"]] = written.get(answer["window_start"], 0) + answer["metered"]
    assert set(written.values()) <= {0, 1}, written
    # And each window has one row per metric
    assert_no_duplicate_rows(stack, tenant_id)
    rows = cpu_rows(stack, tenant_id)
    assert len(rows) >= 4, rows
    # And no usage was counted twice: the windows still add up to the process's CPU time
    assert sum(rows.values()) == pytest.approx(own_cpu, rel=0.05), (rows, own_cpu)
