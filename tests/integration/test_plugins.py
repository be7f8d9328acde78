"""The plugin system end to end: real packages, real workers, a real sandbox worker.

Plugins are made the way an author makes them (``cul8er plugin init``, pip, a .tar.gz on
the plugin path), and called the way another service calls them: ``send_task`` by name.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from billiard.exceptions import WorkerLostError
from celery.exceptions import TimeLimitExceeded
from cryptography.fernet import Fernet

from schemas.events import Event
from schemas.manifest import PluginType
from tests.stack import ROOT, Stack
from workers.pluginhost.template import write_manifest
from workers.runtime.embedded import EmbeddedRedis
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration

#: A test observer; ``{self_test}`` and ``{body}`` are filled per case.
MODULE = """\
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from schemas.events import Event
from schemas.plugins import Ack, HealthStatus, MetricSample


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = ""


class Plugin:
    def __init__(self, config: Config | None, context: Any) -> None:
        self.config = config or Config()
        self.log = context.log
        self.version = context.version

    def self_test(self) -> None:
        {self_test}

    def observe_event(self, event: Event) -> Ack:
        mode = event.data.get("mode")
        {body}

    def report_metric(self, metric: MetricSample) -> Ack:
        return Ack()

    def health_status(self) -> HealthStatus:
        return HealthStatus(healthy=True)

    def flush(self) -> Ack:
        return Ack()
"""

DEFAULT_BODY = 'return Ack(detail=f"{self.version}:{event.event_type}")'


def observer(
    parent: Path,
    name: str,
    version: str = "0.1.0",
    *,
    body: str = DEFAULT_BODY,
    self_test: str = "return None",
    trusted: bool = True,
) -> Path:
    """A plugin folder ``parent/<name>-<version>/`` holding its manifest and its package."""
    root = parent / f"{name}-{version}"
    (root / f"cul8er_{name}").mkdir(parents=True)
    (root / f"cul8er_{name}" / "__init__.py").write_text(
        MODULE.format(body=body, self_test=self_test)
    )
    manifest = write_manifest(
        root, name=name, plugin_type=PluginType.OBSERVER, module=f"cul8er_{name}", trusted=trusted
    )
    data = json.loads(manifest.read_text())
    data["version"] = version
    manifest.write_text(json.dumps(data, indent=2))
    return root


def event(**data: Any) -> dict[str, Any]:
    return Event(event_type="workflow.started", data=data).model_dump(mode="json")


def cli(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *args],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def call(stack: Stack, plugin: str, queue: str | None = None, timeout: float = 30, **data: Any):
    options = {"queue": queue} if queue else {}
    return stack.client.send_task(
        f"plugins.{plugin}.observe_event", kwargs={"event": event(**data)}, **options
    ).get(timeout=timeout)


def until(predicate: Callable[[], Any], timeout: float = 20) -> Any:
    """``predicate``'s first truthy value, or its last (falsy) one after ``timeout`` seconds.

    The caller asserts on the value, with its own message.
    """
    last: list[Any] = [None]

    def check() -> Any:
        last[0] = predicate()
        return last[0]

    try:
        return wait_until(check, timeout=timeout, interval=0.2)
    except TimeoutError:
        return last[0]


def applied(stack: Stack, plugin: str, log: str = "worker-main.log") -> int:
    """How many times the worker's processes applied a change of ``plugin``'s table row."""
    text = (stack.data_dir / log).read_text()
    return sum(
        1 for line in text.splitlines() if "plugin_state_applied" in line and f'"{plugin}"' in line
    )


@pytest.fixture
def stack(stack_factory: Callable[..., Stack], tmp_path: Path) -> Stack:
    made = stack_factory("embedded")
    made.extra_env.update(
        CUL8ER_PLUGIN_PATH=str(tmp_path / "plugins"), CUL8ER_PLUGIN_STATE_TTL="0.2"
    )
    (tmp_path / "plugins").mkdir()
    return made


def test_init_package_pip_installed_runs_on_a_worker(stack: Stack, tmp_path: Path) -> None:
    # Given a plugin package written by `cul8er plugin init`, installed by pip
    # (named the way people type names: "acme-observer" becomes the plugin acme_observer)
    cli(stack, "plugin", "init", "acme-observer", "--trusted", "--directory", str(tmp_path))
    validated = cli(stack, "plugin", "validate", str(tmp_path / "cul8er-acme-observer"))
    assert validated.returncode == 0, validated.stderr
    assert "plugins_table_missing" not in validated.stdout + validated.stderr
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(site),
            str(tmp_path / "cul8er-acme-observer"),
        ],
        check=True,
        timeout=300,
    )
    stack.extra_env["PYTHONPATH"] = str(site)

    # When a worker starts
    stack.start_worker("main")

    # Then the plugin was discovered through its entry point, validated and is active
    listed = {p["name"]: p for p in json.loads(cli(stack, "plugin", "list", "--json").stdout)}
    assert listed["acme_observer"]["state"] == "active"
    assert listed["acme_observer"]["source"] == "entry-point:acme_observer"
    assert listed["acme_observer"]["queue"] == "plugins.acme_observer"
    # And its task runs on the worker, on its own queue
    answer = call(stack, "acme_observer", queue="plugins.acme_observer")
    assert answer == {"ok": True, "result": {"ok": True, "detail": "seen: workflow.started"}}


def test_tar_gz_on_the_plugin_path_runs_in_the_sandbox(stack: Stack, tmp_path: Path) -> None:
    # Given an untrusted plugin from `cul8er plugin init`, packed as a .tar.gz on the plugin path
    cli(stack, "plugin", "init", "packed", "--directory", str(tmp_path))
    archive = tmp_path / "plugins" / "packed-0.1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cul8er-packed" / "cul8er_packed", arcname="cul8er_packed")

    # When a general worker and a sandbox worker run
    stack.start_worker("main")
    stack.start_worker("sandbox", queues="plugins.sandbox", concurrency=1)

    # Then it is found in the archive and routed to the sandbox
    listed = {p["name"]: p for p in json.loads(cli(stack, "plugin", "list", "--json").stdout)}
    assert listed["packed"]["state"] == "active"
    assert listed["packed"]["source"].startswith("archive:")
    assert listed["packed"]["queue"] == "plugins.sandbox"
    # And a plain client's call (Celery's default queue) reaches it through the sandbox
    answer = call(stack, "packed")
    assert answer["result"]["detail"] == "seen: workflow.started"
    sandbox_log = (stack.data_dir / "worker-sandbox.log").read_text()
    assert "plugins.packed.observe_event" in sandbox_log


HOG = """
        if mode == "alloc":
            blocks = []
            while True:
                blocks.append(bytearray(32 * 1024 * 1024))
        if mode == "loop":
            while True:
                try:
                    while True:
                        pass
                except BaseException:
                    pass  # swallows the soft time limit: only a kill stops it
        return Ack(detail="fine")"""


def test_sandbox_kills_runaway_plugins_while_a_provision_runs(stack: Stack, tmp_path: Path) -> None:
    # Given an untrusted plugin that can allocate without bound or loop forever
    observer(tmp_path / "plugins", "hog", body=HOG, trusted=False)
    stack.extra_env.update(
        CUL8ER_SANDBOX_TIME_LIMIT="6",
        CUL8ER_SANDBOX_MEMORY_MB="900",
        CUL8ER_SANDBOX_CPU_SECONDS="30",
    )
    stack.start_worker("main")
    stack.start_worker("sandbox", queues="plugins.sandbox", concurrency=1)

    # When both runaway calls are sent, and a tenant is created on another plugin meanwhile
    alloc = stack.client.send_task(
        "plugins.hog.observe_event", kwargs={"event": event(mode="alloc")}, queue="plugins.sandbox"
    )
    loop = stack.client.send_task(
        "plugins.hog.observe_event", kwargs={"event": event(mode="loop")}, queue="plugins.sandbox"
    )
    created = stack.call("cul8er.tenants.create", name="Busy Corp", plan="free")
    assert created["ok"], created

    # Then the allocation is stopped at the memory limit with a clear error
    answer = alloc.get(timeout=60)
    assert answer["ok"] is False
    assert answer["error"]["code"] == "resource_limit"
    assert "ran out of memory" in answer["error"]["message"]
    # And the endless loop is killed at the hard time limit
    with pytest.raises(TimeLimitExceeded):
        loop.get(timeout=60)
    # And the provision ran to the end meanwhile
    assert stack.wait_run(created["workflow_id"])["status"] == "succeeded"
    # And the sandbox worker still serves the next call
    assert call(stack, "hog", queue="plugins.sandbox")["result"]["detail"] == "fine"
    stack.call("cul8er.tenants.deprovision", tenant_id="busy-corp")


def test_sandbox_kills_a_plugin_past_its_cpu_seconds(stack: Stack, tmp_path: Path) -> None:
    # Given an untrusted plugin that spins, and a sandbox allowing 2 CPU seconds per call
    # (the wall-clock limit is far away, so only the CPU limit can stop it)
    observer(tmp_path / "plugins", "spin", body=HOG, trusted=False)
    stack.extra_env.update(CUL8ER_SANDBOX_TIME_LIMIT="60", CUL8ER_SANDBOX_CPU_SECONDS="2")
    stack.start_worker("sandbox", queues="plugins.sandbox", concurrency=1)

    # When it spins
    spinning = stack.client.send_task(
        "plugins.spin.observe_event", kwargs={"event": event(mode="loop")}, queue="plugins.sandbox"
    )

    # Then the kernel's CPU limit kills its process (SIGXCPU) well before the time limit
    started = time.monotonic()
    with pytest.raises(WorkerLostError) as caught:
        spinning.get(timeout=60)
    assert "SIGXCPU" in str(caught.value) or "signal 24" in str(caught.value)
    assert time.monotonic() - started < 30
    # And the next call gets a fresh process
    assert call(stack, "spin", queue="plugins.sandbox")["result"]["detail"] == "fine"


def test_disable_enable_and_reload_reach_a_running_worker(stack: Stack, tmp_path: Path) -> None:
    # Given version 0.1.0 of a plugin served by a running worker
    plugins = tmp_path / "plugins"
    observer(plugins, "ver", "0.1.0")
    stack.start_worker("main")
    assert call(stack, "ver")["result"]["detail"] == "0.1.0:workflow.started"

    # When it is disabled, then enabled again
    cli(stack, "plugin", "disable", "ver")
    refused = until(lambda: None if (a := call(stack, "ver"))["ok"] else a)
    assert refused["error"]["code"] == "plugin_unavailable"
    assert "disabled" in refused["error"]["message"]
    # (enabled through the public task, as another service would)
    assert stack.call("cul8er.plugins.enable", name="ver")["state"] == "active"
    assert until(lambda: call(stack, "ver")["ok"])
    refused = stack.call("cul8er.plugins.enable", name="nope")
    assert refused["error"]["code"] == "not_found"

    # When 0.2.0 appears and is reloaded
    observer(plugins, "ver", "0.2.0")
    cli(stack, "plugin", "reload", "ver")
    # Then the running worker serves it
    assert until(lambda: call(stack, "ver")["result"]["detail"].startswith("0.2.0"))

    # When a broken 0.3.0 (its self-test fails) is reloaded
    observer(plugins, "ver", "0.3.0", self_test='raise RuntimeError("database unreachable")')
    failed = cli(stack, "plugin", "reload", "ver", "--json", check=False)
    # Then the reload is refused with the cause, and 0.2.0 keeps serving
    assert failed.returncode == 1
    assert "database unreachable" in failed.stdout
    assert json.loads(failed.stdout)["serving"] == "0.2.0"
    # (the refusal is recorded in the table; a worker takes it in at its next call past
    # the state TTL: call until its log says it applied the refused row)
    before = applied(stack, "ver")
    answers: list[str] = []

    def taken_in() -> bool:
        answers.append(call(stack, "ver")["result"]["detail"])
        return applied(stack, "ver") > before

    wait_until(taken_in, timeout=20, interval=0.1, message="the worker never read the refusal")
    assert answers and all(a.startswith("0.2.0") for a in answers), answers
    assert call(stack, "ver")["result"]["detail"].startswith("0.2.0")
    listed = {p["name"]: p for p in json.loads(cli(stack, "plugin", "list", "--json").stdout)}
    assert listed["ver"]["version"] == "0.2.0"
    assert listed["ver"]["state"] == "active"


LEAKY = """
        self.log.info("about_to_answer", token=self.config.token)
        return Ack(detail=f"token={self.config.token}")"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_planted_secret_never_leaves_the_plugin(stack: Stack, tmp_path: Path) -> None:
    # Given a secret in the encrypted file store and a plugin whose config refers to it
    from plugins.secrets.file import FileSecrets, FileSecretsConfig
    from workers.plugin_api import PluginContext
    from workers.runtime.settings import Settings

    planted = "planted-s3cret-4711-value"
    key = Fernet.generate_key().decode()
    settings = Settings(data_dir=stack.data_dir, secrets_key=key)
    store = FileSecrets(
        FileSecretsConfig(),
        PluginContext(name="file", version="1", data_dir=tmp_path / "f", settings=settings),
    )
    store.put("leaky/token", planted)
    observer(tmp_path / "plugins", "leaky", body=LEAKY)
    stack.extra_env.update(
        CUL8ER_SECRETS_KEY=key,
        CUL8ER_PLUGIN_CONFIG=json.dumps({"leaky": {"token": "${secret:file:leaky/token}"}}),
        FLOWER_UNAUTHENTICATED_API="true",
    )
    stack.start_worker("main")
    port = free_port()
    stack._spawn(["flower", "--address=127.0.0.1", f"--port={port}"], "flower.log")

    assert until(lambda: _flower_up(port), timeout=60), "flower did not start"

    # When the plugin runs, logging and answering with its resolved config (again until
    # Flower, whose event receiver connects a little after its web server, has seen a call)
    answers = [call(stack, "leaky")]

    def seen_by_flower() -> dict[str, Any] | None:
        tasks = _flower_tasks(port)
        if tasks is None:
            answers.append(call(stack, "leaky"))
        return tasks

    wait_until(
        seen_by_flower, timeout=60, interval=0.5, message="Flower never showed a plugins.leaky task"
    )

    # Then the value was resolved (not the reference) but every result carries only the mask
    assert {a["result"]["detail"] for a in answers} == {"token=**********"}
    # And no log line, no stored result and no Flower view of the task holds the value
    worker_log = stack.data_dir / "worker-main.log"
    wait_until(
        lambda: worker_log.read_text().count("about_to_answer") >= len(answers),
        timeout=20,
        message=lambda: f"fewer than {len(answers)} about_to_answer lines in {worker_log}",
    )
    logs = worker_log.read_text()
    assert "about_to_answer" in logs
    assert planted not in logs
    client = redis.Redis(unix_socket_path=str(EmbeddedRedis(stack.data_dir).socket_path))
    for name in client.scan_iter():
        value = client.dump(name) or b""
        assert planted.encode() not in value, name
    tasks = until(lambda: _flower_tasks(port), timeout=30)
    assert tasks is not None, "Flower never showed a plugins.leaky task"
    assert any("plugins.leaky.observe_event" in json.dumps(t) for t in tasks.values())
    assert planted not in json.dumps(tasks)
    # And the table keeps the reference, never the value
    from workers.runtime.models import Plugin

    with stack.session() as session:
        row = session.get(Plugin, "leaky")
        assert row is not None
        assert row.config == {"token": "${secret:file:leaky/token}"}


def _flower_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2):
            return True
    except OSError:
        return False


def _flower_tasks(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tasks", timeout=2) as response:
            tasks: dict[str, Any] = json.loads(response.read())
    except OSError:
        return None
    return tasks if any("plugins.leaky" in json.dumps(t) for t in tasks.values()) else None


def test_a_plugin_task_delivered_twice_at_once_has_one_side_effect(stack: Stack) -> None:
    # Given a worker with two processes serving the local platform plugin's queue
    from tests.stack import instance_processes
    from workers.economics.plans import get_plan
    from workers.engine.instances import instance_spec

    stack.start_worker("main", concurrency=2)
    spec = instance_spec("twice", get_plan("free"), "local", 0).model_dump(mode="json")

    # When create_instance is delivered twice at once (a redelivery keeps the task id),
    # and a third time under another id
    sent = [
        stack.client.send_task(
            "plugins.local.create_instance", kwargs={"spec": spec}, task_id=task_id
        )
        for task_id in ("twice-1", "twice-1", "twice-2")
    ]
    answers = [result.get(timeout=60) for result in sent]

    # Then every delivery answers with the same instance, and one process runs
    assert all(a["ok"] for a in answers), answers
    assert {a["result"]["name"] for a in answers} == {"t-twice-app-0"}
    listed = call_op(stack, "local", "list_instances", tenant_id="twice")
    assert [i["name"] for i in listed] == ["t-twice-app-0"]
    assert len(instance_processes(stack.data_dir, "t-twice-app-0")) == 1

    # When destroy is delivered twice
    for _ in range(2):
        assert call_op(stack, "local", "destroy_instance", name="t-twice-app-0") is None
    # Then nothing is left
    assert call_op(stack, "local", "list_instances", tenant_id="twice") == []
    assert instance_processes(stack.data_dir, "t-twice-app-0") == []


def call_op(stack: Stack, plugin: str, op: str, **kwargs: Any) -> Any:
    answer = stack.client.send_task(f"plugins.{plugin}.{op}", kwargs=kwargs).get(timeout=60)
    assert answer["ok"], answer
    return answer["result"]


BROKEN = """
        raise RuntimeError("this observer is broken")"""


def test_events_reach_observers_and_a_failing_one_stops_none(stack: Stack, tmp_path: Path) -> None:
    # Given a webhook receiver on loopback, the webhook observer pointed at it, and an
    # observer that fails on every event
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[tuple[str | None, dict[str, Any]]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers.get("Idempotency-Key"), json.loads(body)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    observer(tmp_path / "plugins", "broken", body=BROKEN)
    url = f"http://127.0.0.1:{server.server_port}/hook"
    stack.extra_env["CUL8ER_PLUGIN_CONFIG"] = json.dumps({"webhook": {"url": url}})
    stack.start_worker("main")
    try:
        # When a tenant is provisioned
        created = stack.call("cul8er.tenants.create", name="Watched", plan="free")
        assert stack.wait_run(created["workflow_id"])["status"] == "succeeded"

        # Then the webhook got every kind of lifecycle event, each keyed by its event id
        def kinds() -> set[str]:
            return {event["event_type"] for _, event in received}

        wanted = {
            "workflow.started",
            "step.started",
            "step.succeeded",
            "tenant.status_changed",
            "workflow.succeeded",
        }
        assert until(lambda: wanted <= kinds()), kinds()
        assert all(key == event["event_id"] for key, event in received)
        # And the broken observer's failures were logged without stopping the webhook
        log = (stack.data_dir / "worker-main.log").read_text()
        assert "observer_crashed" in log or "observer_failed" in log

        # When a plugin is disabled, that is an event too
        cli(stack, "plugin", "disable", "broken")
        assert until(lambda: "plugin.state_changed" in kinds())
        changed = [e for _, e in received if e["event_type"] == "plugin.state_changed"]
        assert changed[-1]["data"]["plugin"] == "broken"
        assert changed[-1]["data"]["to"] == "disabled"
        stack.call("cul8er.tenants.deprovision", tenant_id="watched")
    finally:
        server.shutdown()


def test_a_plugin_action_delivered_twice_at_once_changes_state_once(
    stack: Stack, tmp_path: Path
) -> None:
    # Given a served plugin and a running worker with two processes
    observer(tmp_path / "plugins", "twin")
    stack.start_worker("main", concurrency=2)
    assert call(stack, "twin")["ok"]

    # When disable is delivered twice at once (same task id), and once more under another id
    sent = [
        stack.client.send_task("cul8er.plugins.disable", kwargs={"name": "twin"}, task_id=tid)
        for tid in ("off-1", "off-1", "off-2")
    ]
    answers = [result.get(timeout=60) for result in sent]

    # Then every delivery answers disabled, and the state changed exactly once
    assert {a["state"] for a in answers} == {"disabled"}
    # (the audit trail counts the changes: two deliveries of one task id share one result)
    from sqlalchemy import select

    from workers.runtime.models import AuditEvent

    with stack.session() as session:
        changes = [
            e.data
            for e in session.scalars(
                select(AuditEvent).where(AuditEvent.kind == "plugin.state_changed")
            )
            if e.data.get("plugin") == "twin" and e.data.get("to") == "disabled"
        ]
    assert len(changes) == 1
