"""Metering and billing survive a worker SIGKILLed in the middle of them: usage is metered
once per tenant, metric and window, invoices are made once per tenant and period, and each
invoice's ``invoice.finalized`` is one event, however the kill fell.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from schemas.states import RunStatus, TenantStatus
from tests.chaos._faults import (
    describe_unfinished,
    log_events,
    own_stack,
    read,
    received_by,
    seeded_random,
    start_provisions,
    until,
    wait_runs,
)
from tests.stack import Stack
from tests.webhook import Receiver, webhook_receiver
from workers.economics import billing, metering, periods, pricing
from workers.runtime.models import Instance, Invoice, PlanPeriod, Tenant, UsageRecord, utcnow

pytestmark = pytest.mark.integration

METER_ALL = "cul8er.metering.meter_all"
CLOSE_TASK = "cul8er.billing.close_periods"
#: Metering slots of 30 s: a fan-out killed early in one is redelivered (after the broker's
#: 15 s visibility timeout) before the slot ends, so it meters the same window.
METER_INTERVAL = 30
#: How far into a slot the fan-out may start and still have its redelivery fall in the slot.
SLOT_MARGIN = 8
#: Loopback requests never go through a proxy.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _start_workers(stack: Stack) -> dict[str, Any]:
    return {name: stack.start_worker(name, concurrency=2) for name in ("a", "b")}


def _wait_early_in_slot(interval: int, margin: int) -> None:
    """Sleep until the current metering slot is at most ``margin`` seconds old."""
    offset = time.time() % interval
    if offset > margin - 1:
        time.sleep(interval - offset + 0.2)


def _metered_rows(stack: Stack, window: metering.Window) -> dict[str, Counter[str]]:
    """Tenant → metric → rows in ``window``."""
    rows = read(
        stack,
        lambda s: s.execute(
            select(UsageRecord.tenant_id, UsageRecord.metric).where(
                UsageRecord.window_start == window.start
            )
        ).all(),
    )
    found: dict[str, Counter[str]] = defaultdict(Counter)
    for tenant_id, metric in rows:
        found[tenant_id][metric] += 1
    return found


def _burn_all(stack: Stack, tenant_ids: list[str], seconds: float) -> ThreadPoolExecutor:
    """Have every tenant's instance spin the CPU for ``seconds`` (the calls run in threads)."""
    endpoints = read(
        stack,
        lambda s: list(
            s.scalars(select(Instance.endpoint).where(Instance.tenant_id.in_(tenant_ids)))
        ),
    )
    pool = ThreadPoolExecutor(max_workers=len(endpoints))
    for endpoint in endpoints:
        pool.submit(
            lambda e=endpoint: OPENER.open(f"http://{e}/burn?seconds={seconds}", timeout=60).read()
        )
    return pool


def _provisioned(stack: Stack, plans: list[str], prefix: str) -> list[str]:
    """A tenant provisioned on each of ``plans``, every run succeeded; their ids, sorted."""
    provisions = start_provisions(stack, plans, prefix=prefix)
    finished = wait_runs(stack, [p.run_id for p in provisions], timeout=120)
    statuses = set(finished.status.values())
    assert statuses == {RunStatus.SUCCEEDED}, describe_unfinished(stack, finished)
    return sorted(p.tenant_id for p in provisions)


def _send_fan_out_again(stack: Stack) -> dict[str, Any]:
    """``meter_all`` sent again, as a second beat would; its answer."""
    answer = stack.client.send_task(METER_ALL, queue="metering", ignore_result=False)
    found: dict[str, Any] = answer.get(timeout=60)
    assert found["ok"], found
    return found


def _slot_log(stack: Stack, event: str, window_start: str) -> list[dict[str, Any]]:
    """The workers' ``event`` log lines about the window starting at ``window_start``."""
    return [e for e in log_events(stack, event) if e["window_start"] == window_start]


def _assert_metered_once(stack: Stack, window: metering.Window, tenant_ids: list[str]) -> None:
    """Each tenant has one row per metric in ``window``, and no (tenant, metric, window) has
    two rows in any window."""
    rows = _metered_rows(stack, window)
    expected = Counter(dict.fromkeys(metering.AGGREGATIONS, 1))
    assert {t: rows[t] for t in tenant_ids} == dict.fromkeys(tenant_ids, expected), rows
    doubles = read(
        stack,
        lambda s: s.execute(
            select(UsageRecord.tenant_id, UsageRecord.metric, UsageRecord.window_start)
            .group_by(UsageRecord.tenant_id, UsageRecord.metric, UsageRecord.window_start)
            .having(func.count() > 1)
        ).all(),
    )
    assert doubles == []


@pytest.mark.timeout(300)
def test_sigkill_during_a_metering_fan_out_meters_each_window_once(tmp_path: Path) -> None:
    rng = seeded_random("meter-kill")
    env = {"CUL8ER_METER_INTERVAL": str(METER_INTERVAL), "CUL8ER_METER_CHUNK_SIZE": "1"}
    with own_stack(tmp_path / "stack", None, env) as stack:
        # Given six active tenants on the free plan and two workers of two processes each
        # (one tenant per metering chunk, so the fan-out is six messages over four processes)
        workers = _start_workers(stack)
        tenant_ids = _provisioned(stack, ["free"] * 6, prefix="m")
        _wait_early_in_slot(METER_INTERVAL, SLOT_MARGIN)
        window = metering.window_for(METER_INTERVAL)
        # and every tenant busy spinning the CPU, so metering competes for it
        burning = _burn_all(stack, tenant_ids, seconds=2.0)

        # When the beat task is sent by name and a worker is SIGKILLed 0-1 s later
        fan_out = uuid.uuid4().hex
        sent_at = time.monotonic()
        stack.client.send_task(METER_ALL, queue="metering", task_id=fan_out)
        delay = rng.uniform(0.0, 1.0)
        victim = rng.choice(sorted(workers))
        time.sleep(delay)
        stack.kill(workers[victim])
        at_kill = _metered_rows(stack, window)
        burning.shutdown(wait=True)
        # and it is started again, and the same slot is sent again (as a second beat would)
        workers[victim] = stack.start_worker(victim, concurrency=2)
        again_answer = _send_fan_out_again(stack)
        assert metering.window_for(METER_INTERVAL) == window, "the slot ended too soon"

        # Then every tenant's window is metered, once the killed messages came back
        done = until(
            lambda: sorted(_metered_rows(stack, window)) == tenant_ids, timeout=60, interval=0.25
        )
        metered_in = time.monotonic() - sent_at
        time.sleep(2)  # a late duplicate chunk, were there one, would have run by now
        start = window.start.isoformat()
        fanned, stood_aside, chunks = (
            _slot_log(stack, event, start)
            for event in ("metering_fanned_out", "metering_slot_taken", "metering_chunk_done")
        )
        print(
            f"[meter-kill] killed worker {victim} {delay:.2f} s after the fan-out was sent "
            f"(received by {received_by(stack, fan_out)}), with {len(at_kill)}/{len(tenant_ids)} "
            f"tenants metered; all metered {metered_in:.1f} s after sending; fan-outs run "
            f"{len(fanned)}, stood aside {len(stood_aside)}; chunk runs logged {len(chunks)}, "
            f"metering {sum(e['metered'] for e in chunks)} tenants"
        )
        assert done, (
            f"window {start} not metered for "
            f"{sorted(set(tenant_ids) - set(_metered_rows(stack, window)))}; "
            f"fan-outs {fanned}, stood aside {stood_aside}; see {stack.data_dir}"
        )

        # And each tenant has exactly one row per metric in that window, and no
        # (tenant, metric, window) has two rows in any window
        _assert_metered_once(stack, window, tenant_ids)
        # and no tenant's window was written by two chunk runs
        assert sum(e["metered"] for e in chunks) <= len(tenant_ids), chunks
        # and of the fan-outs of the slot exactly one went ahead, the re-sent one stood aside
        assert len(fanned) == 1, fanned
        assert again_answer.get("skipped") == "slot already claimed", again_answer


# -- billing ---------------------------------------------------------------------------------

#: Tenants whose periods one close invoices: more than one chunk of billing's close (2000
#: tenants a transaction), so the close commits a chunk, emits its events, then goes on.
BILLED_TENANTS = 2100
#: Each tenant has this many ended one-minute periods to invoice.
MINUTES = 1


def _add_billed_tenants(stack: Stack, count: int, since: dt.datetime) -> list[str]:
    """Tenants on starter since ``since``, each with a request count in every minute."""
    ids = [f"bill-{n:05d}" for n in range(count)]
    usage = []
    minute = since.replace(second=0, microsecond=0)
    while minute < utcnow():
        for n, tenant_id in enumerate(ids):
            usage.append(
                {
                    "tenant_id": tenant_id,
                    "metric": "requests",
                    "window_start": minute + dt.timedelta(seconds=30),
                    "window_end": minute + dt.timedelta(seconds=31),
                    "value": 1000.0 * (n % 7 + 1),
                    "aggregation": "sum",
                    "recorded_at": since,
                }
            )
        minute += dt.timedelta(minutes=1)
    with stack.session() as session:
        session.execute(
            insert(Tenant),
            [
                {
                    "id": tenant_id,
                    "name": tenant_id,
                    "plan": "starter",
                    "status": TenantStatus.ACTIVE,
                    "platform": "local",
                    "resources": {},
                    "meta": {},
                    "billing_anchor": since.date(),
                    "created_at": since,
                    "updated_at": since,
                }
                for tenant_id in ids
            ],
        )
        session.execute(
            insert(PlanPeriod),
            [{"tenant_id": t, "plan": "starter", "start_at": since} for t in ids],
        )
        session.execute(insert(UsageRecord), usage)
    return ids


def _kill_the_close(stack: Stack, workers: dict[str, Any], as_of: dt.datetime, delay: float) -> str:
    """Send the close of ``as_of`` and SIGKILL the worker that receives it ``delay`` seconds
    after sending; that worker's name."""
    close_id = uuid.uuid4().hex
    stack.client.send_task(CLOSE_TASK, kwargs={"as_of": as_of.isoformat()}, task_id=close_id)
    sent_at = time.monotonic()
    assert until(lambda: received_by(stack, close_id) is not None, timeout=30, interval=0.02)
    victim = received_by(stack, close_id)
    assert victim is not None
    time.sleep(max(0.0, delay - (time.monotonic() - sent_at)))
    stack.kill(workers[victim])
    return victim


def _invoiced(stack: Stack) -> set[tuple[str, dt.datetime]]:
    """The (tenant, period start) of every invoice."""
    return set(
        read(stack, lambda s: s.execute(select(Invoice.tenant_id, Invoice.period_start)).all())
    )


def _wait_webhook_settled(receiver: Receiver, invoices: int) -> None:
    """Wait until the webhook has heard of ``invoices`` invoices, or stopped hearing
    anything new (3 s without a delivery)."""

    def settled() -> bool:
        before = len(receiver.received)
        time.sleep(3)
        return len(receiver.received) == before

    until(
        lambda: len({k for k, _ in receiver.of_type("invoice.finalized")}) >= invoices,
        timeout=60,
        interval=0.5,
    )
    until(settled, timeout=60, interval=0)


def _assert_one_event_per_invoice(
    stack: Stack, invoices: Sequence[Any], events: list[tuple[str | None, dict[str, Any]]]
) -> None:
    """Each invoice (id, tenant, start, total) was finalized as one event: one key per
    invoice, the key derived from the invoice, every delivery under a key the same event,
    and every invoice's event delivered."""
    keys = Counter(key for key, _ in events)
    by_id = {invoice_id: total for invoice_id, _, _, total in invoices}
    derived = {str(billing.invoice_event_id(invoice_id)): invoice_id for invoice_id in by_id}
    assert set(keys) <= set(derived), set(keys) - set(derived)
    for key, event in events:
        assert key == event["event_id"]
        assert event["data"]["invoice_id"] == derived[key]
        assert event["data"]["total"] == str(pricing.money(by_id[derived[key]]))
    bodies: dict[str | None, set[str]] = defaultdict(set)
    for key, event in events:
        bodies[key].add(json.dumps(event, sort_keys=True))
    assert all(len(b) == 1 for b in bodies.values())
    missing = set(derived) - set(keys)
    assert not missing, (
        f"{len(missing)} of {len(derived)} invoices never had invoice.finalized "
        f"delivered; see {stack.data_dir}"
    )


@pytest.mark.timeout(360)
def test_sigkill_during_a_billing_close_invoices_each_period_once(tmp_path: Path) -> None:
    rng = seeded_random("billing-kill")
    with webhook_receiver() as receiver:
        env = {
            "CUL8ER_BILLING_PERIOD": "minute",
            "CUL8ER_BILLING_CLOSE_INTERVAL": "3600",
            "CUL8ER_PLUGIN_CONFIG": json.dumps({"webhook": {"url": receiver.url}}),
        }
        with own_stack(tmp_path / "stack", None, env) as stack:
            # Given more tenants than one close chunk holds, on one-minute periods, with usage
            since = utcnow().replace(second=0, microsecond=0) - dt.timedelta(minutes=MINUTES)
            since += dt.timedelta(seconds=20)
            tenant_ids = _add_billed_tenants(stack, BILLED_TENANTS, since)
            # and two workers of two processes each
            workers = _start_workers(stack)

            # When the close is sent and the worker running it is SIGKILLed 0-1 s later
            as_of = utcnow()
            delay = rng.uniform(0.0, 1.0)
            victim = _kill_the_close(stack, workers, as_of, delay)
            at_kill = read(stack, lambda s: s.scalar(select(func.count()).select_from(Invoice)))
            events_at_kill = len(receiver.of_type("invoice.finalized"))
            # and started again
            workers[victim] = stack.start_worker(victim, concurrency=2)

            # Then every period that ended is invoiced, once the close came back
            wanted = {
                (t, start)
                for t in tenant_ids
                for start, _ in periods.due_periods(
                    since.date(), "minute", since=since, as_of=as_of
                )
            }
            assert len(wanted) >= BILLED_TENANTS * MINUTES  # one more if a minute ended since
            assert until(lambda: _invoiced(stack) >= wanted, timeout=90, interval=0.5), (
                f"{len(wanted - _invoiced(stack))} periods not invoiced; see {stack.data_dir}"
            )
            # and the webhook has heard of every invoice, or stopped hearing anything new
            _wait_webhook_settled(receiver, len(wanted))
            invoices = read(
                stack,
                lambda s: s.execute(
                    select(Invoice.id, Invoice.tenant_id, Invoice.period_start, Invoice.total)
                ).all(),
            )
            events = receiver.of_type("invoice.finalized")
            keys = Counter(key for key, _ in events)
            print(
                f"[billing-kill] killed worker {victim} {delay:.2f} s after the close was sent, "
                f"with {at_kill}/{len(wanted)} invoices and {events_at_kill} events; in the end "
                f"{len(invoices)} invoices, {len(events)} invoice.finalized deliveries under "
                f"{len(keys)} Idempotency-Keys ({len(events) - len(keys)} redelivered)"
            )

            # And there is exactly one invoice per tenant and period
            per_period = Counter((tenant_id, start) for _, tenant_id, start, _ in invoices)
            assert set(per_period) == wanted
            assert set(per_period.values()) == {1}
            # And each invoice was finalized as one event, none lost
            _assert_one_event_per_invoice(stack, invoices, events)
