"""Plugin versions per tenant, rolled out over tenants: real workers, a real sandbox worker.

A ``gateway`` observer plugin comes in several versions, each answering with the version it
is; a bounded load generator calls it for every tenant the way another service would
(``send_task`` by name, the tenant in the event) while deployments move tenants between
versions.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select, update

from schemas.events import Event
from tests.conftest import build_stack, teardown_stack
from tests.integration.test_plugins import cli, observer
from tests.plugin_factory import rewrite_manifest
from tests.stack import Stack
from workers.runtime.models import Deployment, Tenant, TenantPlugin
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration

PLUGIN = "gateway"
GOOD = 'return Ack(detail=f"{self.version}")'
#: Fails 3 calls in 10 (by the call's number, so the rate is exact).
FLAKY = (
    'if int(event.data.get("n", 0)) % 10 < 3:\n'
    '            raise RuntimeError(f"{self.version} declined the payment")\n'
    '        return Ack(detail=f"{self.version}")'
)
#: Canary 10 → 30 → 50 → 70 → 90 → 100 %, each step held 0.5 s and gated on 1.5 s of calls.
FAST_CANARY: dict[str, Any] = {
    "interval_seconds": 0.5,
    "analysis": {"interval_seconds": 1.5, "count": 1, "probes": 0},
}


def _event(tenant_id: str, n: int) -> dict[str, Any]:
    return Event(event_type="workflow.started", tenant_id=tenant_id, data={"n": n}).model_dump(
        mode="json"
    )


@dataclass
class Answer:
    """One call: when it was sent and answered, for whom, and what came back."""

    sent: float
    done: float
    tenant_id: str
    ok: bool
    version: str
    error: str = ""


@dataclass
class PluginLoad:
    """Calls ``plugins.gateway.observe_event`` for every tenant in turn from a few threads."""

    stack: Stack
    tenants: list[str]
    threads: int = 6
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _pool: ThreadPoolExecutor | None = None
    _numbers: Iterator[int] = field(default_factory=itertools.count)

    def _client(self) -> Celery:
        broker = self.stack.broker_url
        assert broker is not None
        client = Celery("load", broker=broker, backend=broker)
        client.conf.update(task_serializer="json", accept_content=["json"])
        return client

    def _run(self, offset: int) -> None:
        client = self._client()
        turn = itertools.cycle(self.tenants[offset:] + self.tenants[:offset])
        while not self._stop.is_set():
            tenant_id, n = next(turn), next(self._numbers)
            sent = time.time()  # wall clock: compared with the deployment's timeline
            try:
                answer = client.send_task(
                    f"plugins.{PLUGIN}.observe_event", kwargs={"event": _event(tenant_id, n)}
                ).get(timeout=30)
            except Exception as exc:  # a lost call is a failed call
                answer = {"ok": False, "error": {"message": f"{type(exc).__name__}: {exc}"}}
            done = time.time()
            if answer.get("ok"):
                version = answer["result"]["detail"]
                self.answers.append(Answer(sent, done, tenant_id, True, version))
            else:
                message = str(answer.get("error", {}).get("message", ""))
                version = message.split(" declined")[0].split()[-1] if "declined" in message else ""
                self.answers.append(Answer(sent, done, tenant_id, False, version, message))
            time.sleep(0.02)

    def __enter__(self) -> PluginLoad:
        self._pool = ThreadPoolExecutor(self.threads)
        for i in range(self.threads):
            self._pool.submit(self._run, i * len(self.tenants) // self.threads)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        assert self._pool is not None
        self._pool.shutdown(wait=True)

    def rate(self) -> float:
        """Calls per second over the run."""
        if len(self.answers) < 2:
            return 0.0
        span = max(a.done for a in self.answers) - min(a.sent for a in self.answers)
        return len(self.answers) / span

    def failed(self) -> list[Answer]:
        return [a for a in self.answers if not a.ok]


# -- the stack ---------------------------------------------------------------------------------


def install_beside(
    stack: Stack, version: str, body: str = GOOD, self_test: str = "return None"
) -> None:
    """Put ``version`` of the gateway on the plugin path, beside what serves (once)."""
    folder = Path(stack.extra_env["CUL8ER_PLUGIN_PATH"])
    if not (folder / f"{PLUGIN}-{version}").exists():
        observer(folder, PLUGIN, version, body=body, self_test=self_test)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """20 active tenants, a general worker, a sandbox worker and beat; gateway 1.0.0 serves."""
    base = tmp_path_factory.mktemp("plugin-fleet")
    stack = build_stack("redis-postgres", base / "stack")
    plugins = base / "plugins"
    plugins.mkdir()
    stack.extra_env.update(
        CUL8ER_PLUGIN_PATH=str(plugins),
        CUL8ER_PLUGIN_STATE_TTL="0.5",
        CUL8ER_PRODUCTION_APPROVALS="1",
        CUL8ER_PLUGIN_STATS_WINDOW="1",
        CUL8ER_STEP_TIME_LIMIT="60",
        CUL8ER_SECRET_SHOP05_TOKEN="tok-5",
    )
    install_beside(stack, "1.0.0")
    for i in range(20):
        stack.add_tenant(f"shop-{i:02d}", f"Shop {i}")
    with stack.session() as session:
        session.execute(update(Tenant).values(status="active", environment="production"))
    try:
        stack.start_worker("main", concurrency=4)
        stack.start_worker("sandbox", queues="plugins.sandbox", concurrency=1)
        stack.start_beat()
        yield stack
    finally:
        teardown_stack(stack)


def tenants(stack: Stack) -> list[str]:
    with stack.session() as session:
        return sorted(session.scalars(select(Tenant.id)))


def pins(stack: Stack) -> dict[str, str | None]:
    with stack.session() as session:
        return {
            r.tenant_id: r.version
            for r in session.scalars(select(TenantPlugin).where(TenantPlugin.plugin == PLUGIN))
        }


def deployment(stack: Stack, deployment_id: str) -> Deployment:
    with stack.session() as session:
        found = session.get(Deployment, deployment_id)
        assert found is not None
        session.expunge(found)
        return found


def wait_status(
    stack: Stack, deployment_id: str, *statuses: str, timeout: float = 120
) -> Deployment:
    seen: list[Deployment] = []

    def reached() -> bool:
        seen.append(deployment(stack, deployment_id))
        return seen[-1].status in statuses

    wait_until(
        reached,
        timeout=timeout,
        interval=0.2,
        message=lambda: (
            f"deployment is {seen[-1].status}: {seen[-1].reason} {seen[-1].timeline[-3:]}"
        ),
        error=AssertionError,
    )
    return seen[-1]


def create(
    stack: Stack, version: str, strategy: str, config: dict[str, Any] | None = None, **picks: Any
) -> dict[str, Any]:
    answer = stack.call(
        "cul8er.deployments.create",
        plugin=PLUGIN,
        version=version,
        strategy=strategy,
        strategy_config=config or {},
        actor="ops",
        **picks,
    )
    assert answer["ok"], answer
    return answer


def approve(stack: Stack, deployment_id: str) -> None:
    answer = stack.call("cul8er.deployments.approve", deployment_id=deployment_id, actor="cto")
    assert answer["ok"], answer


def reset(stack: Stack) -> None:
    """Every tenant back on the plugin's own version."""
    with stack.session() as session:
        for row in session.scalars(select(TenantPlugin)):
            session.delete(row)


# -- tests ------------------------------------------------------------------------------------


def test_two_tenants_on_two_versions_each_run_their_own(fleet: Stack) -> None:
    # Given gateway 1.1.0 installed beside 1.0.0 and shop-01 pinned to it
    install_beside(fleet, "1.1.0")
    with fleet.session() as session:
        session.add(TenantPlugin(tenant_id="shop-01", plugin=PLUGIN, version="1.1.0", config={}))
    try:
        # When both tenants' calls run on the same worker
        # (a worker sees a plugin's first pinned tenant within the state TTL, 0.5 s here)
        with PluginLoad(fleet, ["shop-00", "shop-01"], threads=2) as load:
            started = time.monotonic()
            wait_until(
                lambda: time.monotonic() - started > 2.5 and len(load.answers) >= 40, timeout=30
            )
        # Then each answer reports its tenant's version
        by_tenant = {
            (a.tenant_id, a.version) for a in load.answers if a.sent > load.answers[0].sent + 1
        }
        assert by_tenant == {("shop-00", "1.0.0"), ("shop-01", "1.1.0")}, by_tenant
        assert load.failed() == []
    finally:
        reset(fleet)


def test_canary_over_twenty_production_tenants_moves_cohorts_with_no_failed_call(
    fleet: Stack,
) -> None:
    install_beside(fleet, "1.1.0")
    everyone = tenants(fleet)
    with PluginLoad(fleet, everyone) as load:
        # When a canary of 1.1.0 starts in production
        created = create(fleet, "1.1.0", "canary", FAST_CANARY)
        deployment_id = created["deployment_id"]
        # Then the sandbox stage passes and it waits for approval before any tenant moves
        waiting = wait_status(fleet, deployment_id, "awaiting_approval", timeout=60)
        assert waiting.timeline[-1]["event"] == "awaiting_approval"
        sandbox = [e for e in waiting.timeline if e.get("stage") == "sandbox"]
        assert sandbox and "self_test" in sandbox[0]["checks"], waiting.timeline
        assert pins(fleet) == {}
        # And once approved, cohorts of 2 → 6 → 10 → 14 → 18 → 20 move and it completes
        approve(fleet, deployment_id)
        done = wait_status(fleet, deployment_id, "succeeded", "rolled_back", "failed")
        time.sleep(1.5)
    assert done.status == "succeeded", done.reason
    cohorts = [e["tenants"] for e in done.timeline if e.get("action") == "set_weight"]
    assert cohorts == [2, 6, 10, 14, 18, 20], done.timeline
    assert set(pins(fleet).values()) == {"1.1.0"} and len(pins(fleet)) == 20
    # And no call failed, at ≥ 20 calls/s, and the last calls all ran 1.1.0
    assert load.failed() == [], load.failed()[:3]
    assert load.rate() >= 20, load.rate()
    last = [a for a in load.answers if a.sent > load.answers[-1].sent - 1]
    assert {a.version for a in last} == {"1.1.0"}
    reset(fleet)


def test_a_version_failing_thirty_percent_is_rolled_back_and_never_runs_after(fleet: Stack) -> None:
    install_beside(fleet, "1.2.0", body=FLAKY)
    everyone = tenants(fleet)
    with PluginLoad(fleet, everyone) as load:
        created = create(fleet, "1.2.0", "canary", FAST_CANARY)
        deployment_id = created["deployment_id"]
        wait_status(fleet, deployment_id, "awaiting_approval", timeout=60)
        approve(fleet, deployment_id)
        ended = wait_status(fleet, deployment_id, "rolled_back", "succeeded", "failed")
        time.sleep(2)
    # Then it rolled back by itself, every moved tenant is on the old version again
    assert ended.status == "rolled_back", ended.reason
    assert ended.reason and ended.reason["code"] == "gate_failed", ended.reason
    assert pins(fleet) == {}
    restored = [e for e in ended.timeline if e["event"] == "tenants_restored"]
    assert restored, ended.timeline
    # And no call that started after the rollback was recorded ran 1.2.0
    recorded = dt.datetime.fromisoformat(restored[0]["at"]).timestamp()
    bad = [a for a in load.answers if a.version == "1.2.0"]
    assert bad, "the bad version never ran: the gate judged nothing"
    assert [a for a in bad if a.sent > recorded] == []
    after = [a for a in load.answers if a.sent > recorded]
    assert len(after) > 20 and {a.version for a in after} == {"1.0.0"}
    # And the failing measurement is on the deployment
    failing = [m for m in ended.measurements if m.get("judgement") == "fail"]
    assert failing and failing[-1]["metrics"]["error_rate"] > 0.1, ended.measurements


def test_a_version_whose_self_test_fails_never_reaches_a_tenant(fleet: Stack) -> None:
    install_beside(fleet, "1.3.0", self_test='raise RuntimeError("no route to the bank")')
    created = create(fleet, "1.3.0", "direct", tenants=["shop-03", "shop-04"])
    ended = wait_status(fleet, created["deployment_id"], "rolled_back", "succeeded", "failed")
    assert ended.status == "rolled_back"
    assert ended.reason and ended.reason["code"] == "sandbox_failed", ended.reason
    assert "no route to the bank" in ended.reason["message"]
    assert pins(fleet) == {}


def test_ab_test_prints_a_verdict_with_its_test_and_p_value(fleet: Stack) -> None:
    install_beside(fleet, "1.1.0")
    everyone = tenants(fleet)
    with PluginLoad(fleet, everyone) as load:
        created = create(
            fleet,
            "1.1.0",
            "ab_test",
            {"analysis": {"interval_seconds": 3, "count": 1, "probes": 0}},
        )
        deployment_id = created["deployment_id"]
        wait_status(fleet, deployment_id, "awaiting_approval", timeout=60)
        approve(fleet, deployment_id)
        ended = wait_status(fleet, deployment_id, "succeeded", "rolled_back", "failed")
    assert load.failed() == []
    assert ended.status == "succeeded", ended.reason
    measured = [m for m in ended.measurements if "comparison" in m]
    assert measured, ended.measurements
    comparison = measured[0]["comparison"]
    assert comparison["new"]["tenants"] == 10 and comparison["old"]["tenants"] == 10
    tests = {t["metric"]: t for t in comparison["tests"]}
    assert tests["error_rate"]["test"] == "Fisher's exact test, two-sided"
    assert tests["error_rate"]["p_value"] == 1.0
    assert tests["latency_ms_avg"]["test"].startswith("Welch")
    assert comparison["verdict"] == "successful"
    # And `cul8er deploy show` prints the verdict with each test and its p-value
    shown = cli(fleet, "deploy", "show", deployment_id).stdout
    assert "Fisher's exact test, two-sided" in shown and "Mann-Whitney U" in shown
    assert "verdict: successful" in shown
    reset(fleet)


#: Answers with its version and what it sees of its token (never the whole secret).
TOKEN_BODY = 'return Ack(detail=f"{self.version}:{len(self.config.token)}:{self.config.token[:2]}")'


def test_a_tenant_runs_its_own_config_with_secrets_resolved_at_call_time(fleet: Stack) -> None:
    # Given 1.4.0 installed, and shop-05 pinned to it with a token that is a secret reference
    install_beside(fleet, "1.4.0", body=TOKEN_BODY)
    set_ = cli(
        fleet,
        "tenant",
        "set-plugin",
        "shop-05",
        PLUGIN,
        "--version",
        "1.4.0",
        "--config",
        json.dumps({"token": "${secret:shop05/token}"}),
        "--json",
    )
    assert json.loads(set_.stdout)["version"] == "1.4.0"
    try:
        # Then the row keeps the reference, never the value
        with fleet.session() as session:
            row = session.get(TenantPlugin, ("shop-05", PLUGIN))
            assert row is not None and row.config == {"token": "${secret:shop05/token}"}
        # And shop-05's calls run 1.4.0 with the resolved token; shop-06 keeps 1.0.0
        with PluginLoad(fleet, ["shop-05", "shop-06"], threads=2) as load:
            started = time.monotonic()
            wait_until(lambda: time.monotonic() - started > 2.5, timeout=10)
        late = {(a.tenant_id, a.version) for a in load.answers[len(load.answers) // 2 :]}
        assert late == {("shop-05", "1.4.0:5:to"), ("shop-06", "1.0.0")}, late
        # And the CLI says who runs which version
        mine = json.loads(cli(fleet, "tenant", "plugins", "shop-05", "--json").stdout)
        gateway = next(p for p in mine if p["plugin"] == PLUGIN)
        assert gateway["version"] == "1.4.0" and gateway["pinned"]
        assert gateway["config_overrides"] == ["token"]
        info = json.loads(cli(fleet, "plugin", "info", PLUGIN, "--json").stdout)
        counts = {v["version"]: v["tenants"] for v in info["versions"]}
        assert counts["1.4.0"] == 1 and counts["1.0.0"] == 19, counts
        # And a config the version's model refuses is refused naming the field
        bad = cli(
            fleet, "tenant", "set-plugin", "shop-05", PLUGIN, "--config", '{"tokn": 1}', check=False
        )
        assert bad.returncode == 1 and "config" in bad.stdout + bad.stderr
    finally:
        reset(fleet)


def test_the_cli_deploys_a_plugin_version_to_chosen_tenants(fleet: Stack) -> None:
    install_beside(fleet, "1.1.0")
    created = cli(
        fleet,
        *("deploy", "create", "--plugin", PLUGIN, "--version", "1.1.0", "--strategy", "direct"),
        *("--tenants", "shop-07,shop-08", "--actor", "ops", "--json"),
    )
    deployment_id = json.loads(created.stdout)["deployment_id"]
    wait_status(fleet, deployment_id, "awaiting_approval", timeout=60)
    cli(fleet, "deploy", "approve", deployment_id, "--actor", "cto")
    wait_status(fleet, deployment_id, "succeeded")
    shown = cli(fleet, "deploy", "show", deployment_id).stdout
    assert f"plugin {PLUGIN} over 2 tenants" in shown
    assert "tenants on 1.1.0: 2/2" in shown
    assert pins(fleet) == {"shop-07": "1.1.0", "shop-08": "1.1.0"}
    reset(fleet)


def test_blue_green_switches_every_tenant_at_once_and_rolls_back_fast(fleet: Stack) -> None:
    install_beside(fleet, "1.1.0")
    everyone = tenants(fleet)
    config = {"auto_promotion_seconds": 0.5, "scale_down_delay_seconds": 0.5}
    with PluginLoad(fleet, everyone) as load:
        created = create(fleet, "1.1.0", "blue_green", config)
        deployment_id = created["deployment_id"]
        wait_status(fleet, deployment_id, "awaiting_approval", timeout=60)
        approve(fleet, deployment_id)
        done = wait_status(fleet, deployment_id, "succeeded", "rolled_back", "failed")
        assert done.status == "succeeded", done.reason
        # every tenant moved in the one switch stage
        switch = next(e for e in done.timeline if e.get("stage") == "switch")
        assert switch["tenants"] == 20 and len(switch["moved_now"]) == 20
        # When it is rolled back after success: a direct deployment, no approval, no sandbox
        back = fleet.call("cul8er.deployments.rollback", deployment_id=deployment_id, actor="ops")
        assert back["ok"], back
        undone = wait_status(fleet, back["deployment_id"], "succeeded", "failed", timeout=60)
        time.sleep(1.5)
    assert undone.status == "succeeded", undone.reason
    assert [s["action"] for s in undone.stages] == ["set_weight", "promote"] or all(
        s["action"] not in ("sandbox", "approval") for s in undone.stages
    )
    assert set(pins(fleet).values()) == {"1.0.0"}
    assert load.failed() == []
    last = [a for a in load.answers if a.sent > load.answers[-1].sent - 1]
    assert {a.version for a in last} == {"1.0.0"}
    reset(fleet)


def test_rolling_moves_tenants_in_batches(fleet: Stack) -> None:
    install_beside(fleet, "1.1.0")
    created = create(
        fleet, "1.1.0", "rolling", {"max_surge": 0, "max_unavailable": 5}, environment="production"
    )
    deployment_id = created["deployment_id"]
    wait_status(fleet, deployment_id, "awaiting_approval", timeout=60)
    approve(fleet, deployment_id)
    done = wait_status(fleet, deployment_id, "succeeded", "rolled_back", "failed")
    assert done.status == "succeeded", done.reason
    batches = [e["batch_size"] for e in done.timeline if e.get("action") == "replace"]
    assert batches == [5, 5, 5, 5], done.timeline
    reset(fleet)


def test_a_version_whose_own_tests_fail_stops_in_the_sandbox(fleet: Stack) -> None:
    # Given 1.5.0 shipping its own tests, one of which fails
    folder = Path(fleet.extra_env["CUL8ER_PLUGIN_PATH"])
    root = folder / f"{PLUGIN}-1.5.0"
    if not root.exists():
        observer(folder, PLUGIN, "1.5.0")
        (root / "tests").mkdir()
        (root / "tests" / "test_refunds.py").write_text(
            "import cul8er_gateway\n\n\n"
            "def test_refunds():\n"
            "    assert cul8er_gateway.Plugin, 'imported'\n"
            "    assert False, 'refunds are broken'\n"
        )
        rewrite_manifest(root)
    created = create(fleet, "1.5.0", "direct", tenants=["shop-09"])
    ended = wait_status(fleet, created["deployment_id"], "rolled_back", "succeeded", "failed")
    assert ended.status == "rolled_back"
    assert ended.reason and ended.reason["code"] == "sandbox_failed", ended.reason
    assert "own tests failed" in ended.reason["message"], ended.reason
    assert "1 failed" in ended.reason["message"], ended.reason
    assert pins(fleet) == {}


def test_tenants_whose_own_config_does_not_fit_the_new_version_stop_it_in_the_sandbox(
    fleet: Stack,
) -> None:
    # Given 1.6.0, whose config model renamed `token` to `api_key`, and shop-10 with a token
    folder = Path(fleet.extra_env["CUL8ER_PLUGIN_PATH"])
    root = folder / f"{PLUGIN}-1.6.0"
    if not root.exists():
        observer(folder, PLUGIN, "1.6.0")
        module = root / f"cul8er_{PLUGIN}" / "__init__.py"
        module.write_text(module.read_text().replace('token: str = ""', 'api_key: str = ""'))
        rewrite_manifest(root)
    answer = fleet.call(
        "cul8er.tenants.set_plugin", tenant_id="shop-10", plugin=PLUGIN, config={"token": "t"}
    )
    assert answer["ok"], answer
    try:
        # When 1.6.0 is deployed to it
        created = create(fleet, "1.6.0", "direct", tenants=["shop-10", "shop-11"])
        ended = wait_status(fleet, created["deployment_id"], "rolled_back", "succeeded", "failed")
        # Then the sandbox refuses it naming the tenant, and nobody moved
        assert ended.reason and ended.reason["code"] == "sandbox_failed", ended.reason
        assert "shop-10" in ended.reason["message"], ended.reason
        assert pins(fleet) == {"shop-10": None}
    finally:
        reset(fleet)
