"""How fast deployments react, measured side by side in one run through a real HAProxy.

    python bench/rollback.py [--rounds 3] [--rate 25]

On one stack (embedded Redis broker, SQLite, a worker, beat, HAProxy, local instances)
with a load generator on the tenant's 127.0.0.1 entry point, each round measures:

- **rollback**: a canary of a release answering 50 % errors; the time from the failing gate
  measurement to 100 % stable traffic, as the engine records it (weights read back from
  HAProxy) and as the load generator sees it (the last answer from the bad release after the
  measurement); the product spec's bar is 60 s, the target 2 s;
- **canary overhead**: a healthy canary's whole time minus its configured pauses and
  analysis intervals (what cul8er itself adds);
- **production deployment**: create, two approvals, a canary, promotion; the spec's bar
  is 30 s;
- failed requests during each.

The baseline, measured in the same run on the same broker and worker: the round trip of a
bare Celery no-op task, the floor of any asynchronous reaction. Figures are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import emit, percentiles  # noqa: E402
from tests.conftest import build_stack, teardown_stack  # noqa: E402
from tests.loadgen import LoadGenerator  # noqa: E402
from tests.stack import Stack  # noqa: E402
from workers.runtime.models import Deployment, Tenant  # noqa: E402
from workers.runtime.waiting import wait_until  # noqa: E402

#: Weight steps of the canaries here: 10 → 30 → 50 → 70 → 90 → 100.
STEPS = 6
PAUSE = 1.0
GATE = {"interval_seconds": 0.5, "count": 2, "probes": 3}
CANARY = {"interval_seconds": PAUSE, "analysis": GATE}
#: What the healthy canary waits on purpose: a pause and a gate's intervals per step.
CONFIGURED_WAIT = STEPS * (PAUSE + GATE["count"] * GATE["interval_seconds"])


def _deploy(stack: Stack, tenant: str, version: str, strategy: str, **extra: Any) -> str:
    result = stack.call(
        "cul8er.deployments.create",
        tenant_id=tenant,
        release={"version": version, "settings": extra.pop("settings", {})},
        strategy=strategy,
        actor="bench",
        **extra,
    )
    if not result["ok"]:
        raise RuntimeError(result)
    return str(result["deployment_id"])


def _wait(stack: Stack, deployment_id: str, *statuses: str, timeout: float = 180) -> Deployment:
    seen: list[Deployment] = []

    def ended() -> bool:
        with stack.session() as session:
            row = session.get(Deployment, deployment_id)
            assert row is not None
            session.expunge(row)
            seen.append(row)
        return seen[-1].status in statuses

    wait_until(ended, timeout=timeout, interval=0.05, error=RuntimeError)
    return seen[-1]


def _tenant(stack: Stack, tenant: str, env: str) -> str:
    result = stack.call("cul8er.tenants.create", name=tenant, tenant_id=tenant, plan="duo")
    stack.wait_run(result["workflow_id"])
    _wait(stack, _deploy(stack, tenant, "1", "direct"), "succeeded")
    # Its first release went out in development; from now on it is in ``env``.
    stack.call("cul8er.tenants.set_environment", tenant_id=tenant, environment=env)
    with stack.session() as session:
        row = session.get(Tenant, tenant)
        assert row is not None
        return str(row.resources["entry"])


def bare_round_trips(stack: Stack, n: int) -> list[float]:
    """Round trips of a bare Celery no-op through the same broker and worker (ms)."""
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        stack.client.send_task("bench.bare_noop").get(timeout=30)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def rollback_round(stack: Stack, tenant: str, entry: str, version: str) -> dict[str, float]:
    """A bad canary; seconds from its failing measurement to all traffic on stable."""
    with LoadGenerator(f"http://{entry}/", rate=25) as load:
        deployment_id = _deploy(
            stack,
            tenant,
            version,
            "canary",
            strategy_config={"interval_seconds": 0.2, "analysis": GATE},
            settings={"error_rate": 0.5},
        )
        row = _wait(stack, deployment_id, "rolled_back", "succeeded")
        time.sleep(1.0)
    failed = [m for m in row.measurements if m.get("judgement") == "fail"][-1]
    measured_at = dt.datetime.fromisoformat(failed["at"]).timestamp()
    restored = next(e for e in row.timeline if e["event"] == "traffic_restored")
    bad = [r.wall_time + (r.latency or 0) for r in load.results if r.version == version]
    last_bad = max(bad) if bad else measured_at
    return {
        "engine_s": restored["seconds_after_measurement"],
        "observed_s": max(0.0, last_bad - measured_at),
        "failed_requests": len(load.failures),
        "requests": load.count,
    }


def canary_round(stack: Stack, tenant: str, entry: str, version: str) -> dict[str, float]:
    """A healthy canary; its whole time and the part beyond its configured waits."""
    with LoadGenerator(f"http://{entry}/", rate=25) as load:
        started = time.monotonic()
        deployment_id = _deploy(stack, tenant, version, "canary", strategy_config=CANARY)
        row = _wait(stack, deployment_id, "succeeded", "rolled_back")
        took = time.monotonic() - started
    if row.status != "succeeded":
        raise RuntimeError(f"healthy canary ended {row.status}: {row.reason}")
    return {
        "total_s": took,
        "beyond_pauses_s": took - CONFIGURED_WAIT,
        "failed_requests": len(load.failures),
        "requests": load.count,
    }


def production_round(stack: Stack, tenant: str, entry: str, version: str) -> dict[str, float]:
    """Create, two approvals, a healthy canary, promotion: the whole time."""
    with LoadGenerator(f"http://{entry}/", rate=25) as load:
        started = time.monotonic()
        deployment_id = _deploy(stack, tenant, version, "canary", strategy_config=CANARY)
        for actor in ("alice", "bob"):
            answer = stack.call(
                "cul8er.deployments.approve", deployment_id=deployment_id, actor=actor
            )
            if not answer["ok"]:
                raise RuntimeError(answer)
        row = _wait(stack, deployment_id, "succeeded", "rolled_back")
        took = time.monotonic() - started
    if row.status != "succeeded":
        raise RuntimeError(f"production canary ended {row.status}: {row.reason}")
    return {"total_s": took, "failed_requests": len(load.failures), "requests": load.count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    stack = build_stack("embedded", Path(tempfile.mkdtemp(prefix="cul8er-bench-")))
    stack.extra_env.update(
        CUL8ER_PRODUCTION_APPROVALS="2",
        CUL8ER_IMPORTS='["bench.noop"]',
        CUL8ER_LOG_LEVEL="WARNING",
    )
    results: dict[str, list[dict[str, float]]] = {"rollback": [], "canary": [], "production": []}
    try:
        stack.start_haproxy()
        stack.start_worker("bench", concurrency=3)
        stack.start_beat()
        entries = {
            "dev": _tenant(stack, "bench-dev", "development"),
            "prod": _tenant(stack, "bench-prod", "production"),
        }
        bare = bare_round_trips(stack, 50)
        for i in range(args.rounds):
            results["rollback"].append(
                rollback_round(stack, "bench-dev", entries["dev"], f"bad{i}")
            )
            results["canary"].append(canary_round(stack, "bench-dev", entries["dev"], f"c{i}"))
            results["production"].append(
                production_round(stack, "bench-prod", entries["prod"], f"p{i}")
            )
            bare += bare_round_trips(stack, 20)
    finally:
        teardown_stack(stack)
    base = percentiles(bare)
    emit("bare celery no-op round trip (ms), same broker and worker", base)
    for name, rounds in results.items():
        keys = rounds[0].keys() if rounds else []
        figures: dict[str, Any] = {}
        for key in keys:
            values = [r[key] for r in rounds]
            figures[key] = {
                "median": round(sorted(values)[len(values) // 2], 3),
                "max": round(max(values), 3),
            }
        if name == "rollback":
            engine_ms = figures["engine_s"]["median"] * 1000
            figures["ratio_engine_to_bare_round_trip"] = round(engine_ms / base["p50"], 1)
            figures["bar"] = "target < 2 s, spec 60 s"
        if name == "production":
            figures["bar"] = "spec 30 s"
        if name == "canary":
            figures["configured_waits_s"] = CONFIGURED_WAIT
        emit(f"{name} ({len(rounds)} rounds)", figures)


if __name__ == "__main__":
    main()
