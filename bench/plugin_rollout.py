"""Plugin deployments over many production tenants, measured side by side on one real stack.

    python bench/plugin_rollout.py [--tenants 1000] [--rounds 1] [--threads 12]

One stack: Redis broker and result backend, a fresh PostgreSQL database, a general
``celery worker``, a worker consuming ``plugins.sandbox``, beat. ``--tenants`` active
production tenants are inserted as rows in one session (not provisioned), so every
deployment waits for an approval first; the ``gateway`` observer plugin answers each call
with ``Ack(detail=<its version>)``. A load generator (``PluginLoad`` of
tests/integration/test_plugin_deployments.py: ``--threads`` threads, each walking the
tenants from its own offset, 20 ms apart) calls ``plugins.gateway.observe_event`` by name for
every tenant, as another service would. Each round measures:

1. **blue_green switch**: from the approval (timeline ``approval_complete``; the tenants are
   in production) until the last tenant first answers the new version, seen by real calls,
   and the deployment's own durations and stage times. The switch is configured with no
   pre-promotion gate, no promotion wait and no scale-down delay;
2. **rollback**: a canary of a version failing 30 % of calls, under the same load plus a
   second load walking only the first cohort; from the failing measurement to
   ``tenants_restored`` (the engine's ``seconds_after_measurement``), and until calls of
   every moved tenant answer the old version again (the target is 2 s, the spec's bar 60 s);
3. **latency**: the load's round trips (p50/p95/p99) in a quiet window before the switch and
   during it (approval → last tenant on the new version), and their ratio.

Baselines, measured in the same run on the same broker and worker: a bare Celery no-op round
trip (``bench.bare_noop``, one caller, idle stack) and a plugin call made the same way.
Figures are printed, never asserted; the resolution of "seen by calls" is one pass of the
load over the tenants, printed too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import emit, percentiles  # noqa: E402
from bench.rollback import bare_round_trips  # noqa: E402
from schemas.events import Event  # noqa: E402
from tests.conftest import build_stack, teardown_stack  # noqa: E402
from tests.integration.test_plugin_deployments import (  # noqa: E402
    FAST_CANARY,
    FLAKY,
    PLUGIN,
    Answer,
    PluginLoad,
    approve,
    create,
    install_beside,
    reset,
    wait_status,
)
from tests.stack import Stack  # noqa: E402
from workers.delivery.cohorts import hash_order  # noqa: E402
from workers.runtime.models import Deployment, Tenant, utcnow  # noqa: E402

OLD = "1.0.0"
#: One switch: no pre-promotion gate (no tenant runs a preview), no wait for a person, no
#: warm old stack.
BLUE_GREEN: dict[str, Any] = {
    "pre_promotion_analysis": None,
    "auto_promotion_seconds": 0,
    "scale_down_delay_seconds": 0,
}
#: Seconds of load before the quiet window (the first calls load the plugin everywhere).
WARM_UP = 2.0
QUIET = 8.0
#: How long calls may take to show every tenant on its version after the deployment ended.
SETTLE = 60.0
#: Where a deployment stops by itself (``paused``: held for a person, which a bench is not).
FINAL = ("succeeded", "rolled_back", "failed", "aborted", "paused")


def _at(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(event["at"]).timestamp()


def _event(row: Deployment, name: str, **match: Any) -> dict[str, Any]:
    """The first timeline event ``name`` (matching ``match``) of ``row``."""
    for event in row.timeline:
        if event["event"] == name and all(event.get(k) == v for k, v in match.items()):
            return dict(event)
    raise RuntimeError(f"no {name} {match} in the timeline: {row.timeline}")


def _ms(answers: list[Answer]) -> list[float]:
    return [(a.done - a.sent) * 1000 for a in answers]


# -- the stack --------------------------------------------------------------------------------


def add_tenants(stack: Stack, count: int) -> list[str]:
    """``count`` active production tenants, inserted in one session (not provisioned)."""
    ids = [f"shop-{i:05d}" for i in range(count)]
    with stack.session() as session:
        session.add_all(
            Tenant(
                id=tenant_id,
                name=f"Shop {tenant_id}",
                plan="free",
                status="active",
                environment="production",
                platform="local",
                resources={},
                meta={},
                billing_anchor=utcnow().date(),
            )
            for tenant_id in ids
        )
    return ids


def start(stack: Stack, tenants: int, concurrency: int) -> list[str]:
    """Configure, fill and start the stack (the caller tears it down); the tenants."""
    plugins = stack.data_dir / "plugins"
    plugins.mkdir()
    stack.extra_env.update(
        CUL8ER_PLUGIN_PATH=str(plugins),
        CUL8ER_PLUGIN_STATE_TTL="0.5",
        CUL8ER_PRODUCTION_APPROVALS="1",
        CUL8ER_PLUGIN_STATS_WINDOW="1",
        CUL8ER_STEP_TIME_LIMIT="60",
        CUL8ER_IMPORTS='["bench.noop"]',
        CUL8ER_LOG_LEVEL="WARNING",
    )
    install_beside(stack, OLD)
    ids = add_tenants(stack, tenants)
    stack.start_worker("main", concurrency=concurrency)
    stack.start_worker("sandbox", queues="plugins.sandbox", concurrency=1)
    stack.start_beat()
    return ids


def idle_plugin_round_trips(stack: Stack, tenants: list[str], n: int) -> list[float]:
    """Plugin calls one after another by one caller, as ``bare_round_trips`` (ms)."""
    samples = []
    for i in range(n):
        started = time.perf_counter()
        event = Event(event_type="workflow.started", tenant_id=tenants[i % len(tenants)])
        answer = stack.client.send_task(
            f"plugins.{PLUGIN}.observe_event", kwargs={"event": event.model_dump(mode="json")}
        ).get(timeout=30)
        samples.append((time.perf_counter() - started) * 1000)
        if not answer.get("ok"):
            raise RuntimeError(answer)
    return samples


# -- 1 and 3: blue_green switch ---------------------------------------------------------------


def _first_answers(load: PluginLoad, version: str, since: float) -> dict[str, float]:
    """Per tenant: when its first call sent after ``since`` came back from ``version``."""
    first: dict[str, float] = {}
    for answer in list(load.answers):
        if answer.version == version and answer.sent >= since and answer.tenant_id not in first:
            first[answer.tenant_id] = answer.done
    return first


def _until_all(
    load: PluginLoad, tenants: list[str], version: str, since: float
) -> dict[str, float]:
    """Wait (up to ``SETTLE``) until every tenant answered ``version``; the first answers."""
    deadline = time.monotonic() + SETTLE
    first = _first_answers(load, version, since)
    while len(first) < len(tenants) and time.monotonic() < deadline:
        time.sleep(0.2)
        first = _first_answers(load, version, since)
    return first


def _quiet_window(load: PluginLoad, tenants: list[str]) -> tuple[list[Answer], float]:
    """Load with no deployment: its answers and the seconds one pass over the tenants takes."""
    time.sleep(WARM_UP)
    begin = time.time()
    time.sleep(QUIET)
    end = time.time()
    quiet = [a for a in list(load.answers) if begin <= a.sent and a.done <= end]
    rate = len(quiet) / (end - begin)
    return quiet, len(tenants) / rate if rate else float("inf")


def switch_round(stack: Stack, tenants: list[str], version: str, threads: int) -> dict[str, Any]:
    """A blue_green deployment of ``version`` to every tenant, under load."""
    install_beside(stack, version)
    reset(stack)
    time.sleep(1.0)  # every worker sees no pinned tenant (plugin state TTL 0.5 s)
    with PluginLoad(stack, tenants, threads=threads) as load:
        quiet, pass_s = _quiet_window(load, tenants)
        created = create(stack, version, "blue_green", BLUE_GREEN)
        deployment_id = created["deployment_id"]
        wait_status(stack, deployment_id, "awaiting_approval", timeout=120)
        approve(stack, deployment_id)
        ended = wait_status(stack, deployment_id, *FINAL, timeout=300)
        approved = _at(_event(ended, "approval_complete"))
        first = _until_all(load, tenants, version, approved)
    if ended.status != "succeeded":
        raise RuntimeError(f"blue_green ended {ended.status}: {ended.reason}")
    last = max(first.values()) if len(first) == len(tenants) else float("nan")
    during = [a for a in load.answers if approved <= a.sent <= max(last, _at(ended.timeline[-1]))]
    switched = _at(_event(ended, "stage_done", stage="switch"))
    old_after = [a.sent for a in load.answers if a.version == OLD and a.sent > switched]
    return {
        "row": ended,
        "approved": approved,
        "last_new": last,
        "seen_new": len(first),
        "last_old_after_switch": max(old_after, default=switched) - switched,
        "pass_s": pass_s,
        "quiet_ms": _ms([a for a in quiet if a.ok]),
        "during_ms": _ms([a for a in during if a.ok]),
        "failed": len(load.failed()),
        "calls": len(load.answers),
        "rate": load.rate(),
    }


def switch_figures(result: dict[str, Any], tenants: int) -> dict[str, Any]:
    """The switch round as printed figures (seconds)."""
    row: Deployment = result["row"]
    approved, last = result["approved"], result["last_new"]
    created = _at(_event(row, "created"))
    ended = _at(_event(row, "succeeded"))
    preview = _event(row, "stage_done", stage="route-preview")
    switch = _event(row, "stage_done", stage="switch")
    return {
        "measured_from": "approval (tenants in production)",
        "approval_to_last_tenant_on_new_s": round(last - approved, 3),
        "switch_commit_to_last_tenant_on_new_s": round(last - _at(switch), 3),
        "tenants_seen_on_new": f"{result['seen_new']}/{tenants}",
        "deployment_approval_to_succeeded_s": round(ended - approved, 3),
        "deployment_created_to_succeeded_s": round(ended - created, 3),
        "approval_to_route_preview_s": round(_at(preview) - approved, 3),
        "route_preview": preview.get("preview", preview.get("tenants")),
        "approval_to_switch_s": round(_at(switch) - approved, 3),
        "tenants_moved_by_switch": len(switch.get("moved_now", [])),
        "last_call_sent_after_switch_commit_on_old_s": round(result["last_old_after_switch"], 3),
        "resolution_one_load_pass_s": round(result["pass_s"], 3),
        "calls": result["calls"],
        "failed_calls": result["failed"],
        "calls_per_s": round(result["rate"], 1),
    }


# -- 2: rollback ------------------------------------------------------------------------------


def _moved(row: Deployment) -> list[str]:
    moved: list[str] = []
    for event in row.timeline:
        if event["event"] == "stage_done":
            moved += [str(t) for t in event.get("moved_now", [])]
    return moved


def _back_times(answers: list[Answer], moved: list[str], bad: str, after: float) -> list[float]:
    """Per moved tenant: when its first old answer after its last bad one (and ``after``)
    came back; tenants never seen back are left out."""
    mine = set(moved)
    by_tenant: dict[str, list[Answer]] = {t: [] for t in moved}
    for answer in answers:
        if answer.tenant_id in mine:
            by_tenant[answer.tenant_id].append(answer)
    back = []
    for calls in by_tenant.values():
        calls.sort(key=lambda a: a.sent)
        last_bad = max((i for i, a in enumerate(calls) if a.version == bad), default=-1)
        later = [a for a in calls[last_bad + 1 :] if a.version == OLD and a.sent >= after]
        if later:
            back.append(later[0].done)
    return back


def rollback_round(stack: Stack, tenants: list[str], version: str, threads: int) -> dict[str, Any]:
    """A canary of a version failing 30 % of calls; how fast every moved tenant is back."""
    install_beside(stack, version, body=FLAKY)
    reset(stack)
    time.sleep(1.0)
    first_cohort = hash_order(PLUGIN, tenants)[: max(1, len(tenants) // 10)]
    with (
        PluginLoad(stack, tenants, threads=threads) as load,
        PluginLoad(stack, first_cohort, threads=max(2, threads // 2)) as watch,
    ):
        time.sleep(WARM_UP)
        deployment_id = create(stack, version, "canary", FAST_CANARY)["deployment_id"]
        wait_status(stack, deployment_id, "awaiting_approval", timeout=120)
        approve(stack, deployment_id)
        ended = wait_status(stack, deployment_id, *FINAL, timeout=300)
        failed = [m for m in ended.measurements if m.get("judgement") == "fail"]
        measured = _at(failed[-1]) if failed else time.time()
        moved = _moved(ended)
        deadline = time.monotonic() + SETTLE
        answers: list[Answer] = []
        while time.monotonic() < deadline:
            answers = list(load.answers) + list(watch.answers)
            if len(_back_times(answers, moved, version, measured)) == len(moved):
                break
            time.sleep(0.2)
    return {
        "row": ended,
        "measured": measured,
        "moved": moved,
        "answers": list(load.answers) + list(watch.answers),
        "failed_measurement": failed[-1] if failed else None,
        "version": version,
    }


def rollback_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The rollback round as printed figures (seconds)."""
    row: Deployment = result["row"]
    if row.status != "rolled_back" or result["failed_measurement"] is None:
        return {"status": row.status, "reason": row.reason}
    measured, moved, version = result["measured"], result["moved"], result["version"]
    answers: list[Answer] = result["answers"]
    restored = _event(row, "tenants_restored")
    back = _back_times(answers, moved, version, measured)
    bad_after = [a.sent for a in answers if a.version == version and a.sent > measured]
    metrics = result["failed_measurement"]["metrics"]
    return {
        "engine_measurement_to_tenants_restored_s": restored["seconds_after_measurement"],
        "calls_measurement_to_every_moved_tenant_on_old_s": (
            round(max(back) - measured, 3) if len(back) == len(moved) else float("nan")
        ),
        "moved_tenants_seen_back": f"{len(back)}/{len(moved)}",
        "last_bad_call_sent_after_measurement_s": (
            round(max(bad_after) - measured, 3) if bad_after else 0.0
        ),
        "bad_calls_sent_after_restore": sum(1 for t in bad_after if t > _at(restored)),
        "gate_error_rate": round(metrics.get("error_rate", 0.0), 3),
        "gate_requests": metrics.get("requests"),
        "calls_answered_by_new_version_before_measurement": sum(
            1 for a in answers if a.version == version and a.done <= measured
        ),
        "calls": len(answers),
        "failed_calls": sum(1 for a in answers if not a.ok),
        "bar": "target < 2 s, spec 60 s",
    }


# -- output -----------------------------------------------------------------------------------


def latency_figures(result: dict[str, Any], bare: dict[str, float]) -> dict[str, Any]:
    """Round trips of the load, quiet and during the switch, and against bare Celery."""
    quiet, during = percentiles(result["quiet_ms"]), percentiles(result["during_ms"])
    return {
        "quiet_ms": quiet,
        "during_switch_ms": during,
        "p99_ratio_during_to_quiet": round(during["p99"] / quiet["p99"], 2),
        "p50_ratio_during_to_quiet": round(during["p50"] / quiet["p50"], 2),
        "p50_ratio_quiet_load_to_bare": round(quiet["p50"] / bare["p50"], 1),
    }


def _median(values: list[Any]) -> Any:
    numbers = sorted(v for v in values if isinstance(v, int | float) and v == v)
    return numbers[len(numbers) // 2] if numbers else None


def table(rows: list[tuple[str, list[Any]]]) -> None:
    """One line per figure: its median, its max and each round's value."""
    width = max(len(name) for name, _ in rows)
    rounds = max(len(values) for _, values in rows)
    head = "  ".join(f"r{i + 1:<9}" for i in range(rounds))
    print(f"\n{'figure':<{width}}  {'median':>10}  {'max':>10}  {head}")
    for name, values in rows:
        numbers = [v for v in values if isinstance(v, int | float) and v == v]
        med = _median(values)
        top = max(numbers) if numbers else None
        cells = "  ".join(f"{v!s:<10}" for v in values)
        print(f"{name:<{width}}  {med!s:>10}  {top!s:>10}  {cells}")


def report(
    bare: list[float], plugin_idle: list[float], rounds: list[dict[str, dict[str, Any]]]
) -> None:
    """The summary table, then every figure of every round (one JSON line each)."""
    base, idle = percentiles(bare), percentiles(plugin_idle)
    ratio = round(idle["p50"] / base["p50"], 2)
    rows: list[tuple[str, list[Any]]] = [
        ("bare celery no-op p50 ms (idle, 1 caller)", [base["p50"]]),
        ("plugin call p50 ms (idle, 1 caller)", [idle["p50"]]),
        ("plugin p50 / bare p50 (idle)", [ratio]),
    ]
    picks = [
        ("switch", "approval_to_last_tenant_on_new_s", "1. approval -> last tenant on new (s)"),
        ("switch", "switch_commit_to_last_tenant_on_new_s", "1. switch commit -> last on new (s)"),
        ("switch", "deployment_approval_to_succeeded_s", "1. deployment approval->succeeded (s)"),
        ("switch", "deployment_created_to_succeeded_s", "1. deployment created->succeeded (s)"),
        (
            "switch",
            "last_call_sent_after_switch_commit_on_old_s",
            "1. last old call after commit (s)",
        ),
        ("switch", "resolution_one_load_pass_s", "1. resolution: one load pass (s)"),
        ("rollback", "engine_measurement_to_tenants_restored_s", "2. measurement -> restored (s)"),
        ("rollback", "calls_measurement_to_every_moved_tenant_on_old_s", "2. calls: all back (s)"),
        ("rollback", "bad_calls_sent_after_restore", "2. bad calls sent after restore"),
    ]
    rows += [(label, [r[part].get(key) for r in rounds]) for part, key, label in picks]
    for key, label in (("quiet_ms", "quiet"), ("during_switch_ms", "switch")):
        for q in ("p50", "p95", "p99"):
            rows.append((f"3. {label} {q} ms", [r["latency"][key][q] for r in rounds]))
    rows.append(
        ("3. p99 switch / quiet", [r["latency"]["p99_ratio_during_to_quiet"] for r in rounds])
    )
    table(rows)
    emit("bare celery no-op round trip (ms), idle, same broker and worker", base)
    emit("plugin call round trip (ms), idle, one caller", {**idle, "ratio_p50_to_bare": ratio})
    for i, result in enumerate(rounds, 1):
        for part, figures in result.items():
            emit(f"round {i}: {part}", figures)


# -- main -------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def measure(stack: Stack, args: argparse.Namespace) -> None:
    """Start everything, run the rounds, print."""
    tenants = start(stack, args.tenants, args.concurrency)
    bare = bare_round_trips(stack, 100)
    plugin_idle = idle_plugin_round_trips(stack, tenants, 100)
    rounds: list[dict[str, dict[str, Any]]] = []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}: blue_green over {len(tenants)} tenants", flush=True)
        switched = switch_round(stack, tenants, f"2.{i}.0", args.threads)
        print(f"round {i + 1}/{args.rounds}: failing canary", flush=True)
        rolled = rollback_round(stack, tenants, f"3.{i}.0", args.threads)
        base = percentiles(bare)
        rounds.append(
            {
                "switch": switch_figures(switched, len(tenants)),
                "rollback": rollback_figures(rolled),
                "latency": latency_figures(switched, base),
            }
        )
        bare += bare_round_trips(stack, 50)
        plugin_idle += idle_plugin_round_trips(stack, tenants, 50)
    report(bare, plugin_idle, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=12, help="load generator threads")
    parser.add_argument("--concurrency", type=int, default=4, help="main worker processes")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # a kill cleans up like Ctrl-C
    stack = build_stack("redis-postgres", Path(tempfile.mkdtemp(prefix="cul8er-bench-")))
    done = False
    try:
        measure(stack, args)
        done = True
    except KeyboardInterrupt:
        print("interrupted: stopping workers and dropping the database", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        teardown_stack(stack)
        if done:
            shutil.rmtree(stack.data_dir, ignore_errors=True)
        else:
            print(f"worker logs kept in {stack.data_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
