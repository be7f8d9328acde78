"""Observers: the log, webhook and prometheus built-ins.

Everything is real: a structlog pipeline, an ``http.server`` on 127.0.0.1 as the webhook
receiver, child Python processes writing multi-process Prometheus metrics, and the
exporter's HTTP server.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr, ValidationError

from plugins.builtin import builtin_manifest
from plugins.observers.log import LogObserver
from plugins.observers.webhook import (
    SIGNATURE_HEADER,
    WebhookConfig,
    WebhookObserver,
    metric_idempotency_key,
)
from schemas.events import Event
from schemas.manifest import PluginType
from schemas.plugins import MetricSample
from workers.plugin_api import PluginContext
from workers.pluginhost.contracts import Observer, check_contract
from workers.runtime import metrics
from workers.runtime.errors import PermanentError, TransientError
from workers.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


def context(tmp_path: Path, name: str, **settings: Any) -> PluginContext:
    """A real plugin context over settings rooted at ``tmp_path``."""
    return PluginContext(
        name=name,
        version="1.0.0",
        data_dir=tmp_path / "plugins" / name,
        settings=Settings(data_dir=tmp_path, **settings),
    )


def step_failed(**data: Any) -> Event:
    return Event(
        event_type="step.failed",
        tenant_id="t-1",
        workflow_id="wf-1",
        subject="cul8er.steps.create_instances",
        data={"phase": "forward", "attempt": 3, **data},
    )


def fresh_secret() -> str:
    return f"whsec-{secrets.token_hex(16)}"


# -- contracts --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["log", "webhook", "prometheus"])
def test_builtin_manifests_name_real_factories(name: str) -> None:
    # Given the built-in manifest of an observer
    manifest = builtin_manifest(name)
    assert manifest is not None and manifest.type is PluginType.OBSERVER
    # When its module and factory are imported
    factory = getattr(importlib.import_module(manifest.module), manifest.factory)
    # Then the factory fulfils the observer contract, and its config model exists
    check_contract(name, PluginType.OBSERVER, factory)
    if manifest.config_model is not None:
        module, attr = manifest.config_model.split(":")
        assert getattr(importlib.import_module(module), attr) is WebhookConfig


# -- log --------------------------------------------------------------------------------------


def test_log_observer_writes_one_line_per_event_and_metric(tmp_path: Path) -> None:
    # Given the log observer built as the registry builds it
    observer = LogObserver(None, context(tmp_path, "log"))
    event = step_failed(error={"code": "transient", "message": "engine down"})
    sample = MetricSample(name="queue_depth", value=12, labels={"queue": "steps"})
    # When an event and a metric are observed through a real structlog pipeline
    with structlog.testing.capture_logs() as lines:
        event_ack = observer.observe_event(event)
        metric_ack = observer.report_metric(sample)
    # Then each wrote exactly one line carrying the envelope
    assert event_ack.ok and metric_ack.ok
    assert [line["event"] for line in lines] == ["event_observed", "metric_reported"]
    observed, reported = lines
    assert observed["event_type"] == "step.failed"
    assert observed["event_id"] == str(event.event_id)
    assert observed["tenant_id"] == "t-1" and observed["workflow_id"] == "wf-1"
    assert observed["subject"] == "cul8er.steps.create_instances"
    assert observed["data"]["error"]["message"] == "engine down"
    assert observed["plugin"] == "log"
    assert reported["name"] == "queue_depth" and reported["value"] == 12
    assert reported["labels"] == {"queue": "steps"}
    assert observer.health_status().healthy and observer.flush().ok


def test_observers_are_instances_of_the_contract(tmp_path: Path) -> None:
    # Given the log and webhook observers
    log_observer = LogObserver(None, context(tmp_path, "log"))
    webhook = WebhookObserver(WebhookConfig(url="http://127.0.0.1:9/hook"), None)
    # Then both satisfy the runtime-checkable contract
    assert isinstance(log_observer, Observer)
    assert isinstance(webhook, Observer)


# -- webhook ----------------------------------------------------------------------------------


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 answering scripted statuses (the last one repeats)."""

    server: ThreadingHTTPServer
    statuses: list[int] = field(default_factory=lambda: [200])
    delay: float = 0.0
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hooks/tok-abc?key=q1"

    @property
    def accepted(self) -> list[Delivery]:
        return [d for d in self.deliveries if 200 <= d.status < 300]

    def next_status(self) -> int:
        with self.lock:
            return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            rec = holder[0]
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if rec.delay:
                time.sleep(rec.delay)
            status = rec.next_status()
            with rec.lock:
                rec.deliveries.append(Delivery(self.path, dict(self.headers), body, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    holder.append(Receiver(server))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield holder[0]
    server.shutdown()
    server.server_close()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def all_text(exc: BaseException) -> str:
    """The error's message, repr and those of every error it was raised from."""
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None:
        parts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def test_webhook_retries_503_then_delivers_once_signed(receiver: Receiver) -> None:
    # Given a receiver that answers 503 twice, then 200, and a signing key
    receiver.statuses = [503, 503, 200]
    key = fresh_secret()
    observer = WebhookObserver(WebhookConfig(url=receiver.url, secret=SecretStr(key)), None)
    event = step_failed()
    # When the event is observed
    ack = observer.observe_event(event)
    # Then three attempts were made and exactly one was accepted
    assert ack.ok and "3 attempt" in ack.detail
    assert [d.status for d in receiver.deliveries] == [503, 503, 200]
    assert len(receiver.accepted) == 1
    # And every attempt carried the event id as its key and the same signed body
    for delivery in receiver.deliveries:
        assert delivery.path == "/hooks/tok-abc?key=q1"
        assert delivery.headers["Idempotency-Key"] == str(event.event_id)
        assert delivery.headers["X-Cul8er-Event"] == "step.failed"
        assert delivery.headers["Content-Type"] == "application/json"
        expected = "sha256=" + hmac.new(key.encode(), delivery.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(delivery.headers[SIGNATURE_HEADER], expected)
    assert json.loads(receiver.accepted[0].body) == event.model_dump(mode="json")
    assert observer.health_status().healthy


def test_webhook_retries_429_and_sends_extra_headers(receiver: Receiver) -> None:
    # Given a receiver that rate-limits once, and a config with an extra header
    receiver.statuses = [429, 204]
    config = WebhookConfig(url=receiver.url, headers={"X-Team": "ops", "content-type": "x/y"})
    # When an event is observed
    WebhookObserver(config, None).observe_event(step_failed())
    # Then it was retried; the extra header went along, ours won the clash; no signature
    assert [d.status for d in receiver.deliveries] == [429, 204]
    headers = receiver.accepted[0].headers
    assert headers["X-Team"] == "ops"
    assert headers["Content-Type"] == "application/json"
    assert SIGNATURE_HEADER not in headers


def test_webhook_400_is_permanent_without_retries(receiver: Receiver) -> None:
    # Given a receiver that refuses the payload
    receiver.statuses = [400]
    observer = WebhookObserver(WebhookConfig(url=receiver.url, attempts=5), None)
    # When an event is observed
    with pytest.raises(PermanentError) as raised:
        observer.observe_event(step_failed())
    # Then one attempt was made, the error names the status, and health says why
    assert len(receiver.deliveries) == 1
    assert "400" in str(raised.value) and "127.0.0.1" in str(raised.value)
    health = observer.health_status()
    assert not health.healthy and "400" in health.detail


def test_webhook_receiver_down_is_transient_and_never_leaks_the_key(tmp_path: Path) -> None:
    # Given a URL (with a token in its path) where nothing listens, and a signing key
    key = fresh_secret()
    port = free_port()
    config = WebhookConfig(
        url=f"http://127.0.0.1:{port}/hooks/tok-path-123?sig=q-456",
        secret=SecretStr(key),
        attempts=2,
        timeout=1,
    )
    observer = WebhookObserver(config, context(tmp_path, "webhook"))
    # When an event is observed, logs captured
    with structlog.testing.capture_logs() as lines, pytest.raises(TransientError) as raised:
        observer.observe_event(step_failed())
    # Then the error names the host and the last failure, after both attempts
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "after 2 attempt" in message
    assert "ConnectionError" in message
    # And neither the key nor the URL's token appears in the error or in any log line
    assert key not in all_text(raised.value) and "tok-path-123" not in message
    logged = repr(lines)
    assert key not in logged and "tok-path-123" not in logged
    assert any(line["event"] == "webhook_retry" for line in lines)
    assert key not in repr(config) and key not in config.model_dump_json()
    health = observer.health_status()
    assert not health.healthy and f"127.0.0.1:{port}" in health.detail
    assert key not in health.detail


def test_webhook_503_every_time_names_the_last_status(receiver: Receiver) -> None:
    # Given a receiver that stays unavailable
    receiver.statuses = [503]
    observer = WebhookObserver(WebhookConfig(url=receiver.url, attempts=2), None)
    # When an event is observed
    with pytest.raises(TransientError) as raised:
        observer.observe_event(step_failed())
    # Then both attempts were made and the error names the last status
    assert len(receiver.deliveries) == 2
    assert "last status 503" in str(raised.value)
    # And a later successful delivery makes the observer healthy again
    receiver.statuses = [200]
    observer.observe_event(step_failed())
    assert observer.health_status().healthy


def test_webhook_timeout_is_retried_then_transient(receiver: Receiver) -> None:
    # Given a receiver slower than the configured timeout
    receiver.delay = 1.0
    observer = WebhookObserver(WebhookConfig(url=receiver.url, attempts=2, timeout=0.2), None)
    # When an event is observed
    with pytest.raises(TransientError) as raised:
        observer.observe_event(step_failed())
    # Then it timed out twice
    assert "after 2 attempt" in str(raised.value) and "Timeout" in str(raised.value)


def test_webhook_metric_key_is_stable_across_deliveries(receiver: Receiver) -> None:
    # Given a metric sample delivered twice (a redelivered task)
    sample = MetricSample(name="cpu_seconds", value=3.5, kind="counter", labels={"t": "t-1"})
    observer = WebhookObserver(WebhookConfig(url=receiver.url), None)
    # When it is reported twice
    observer.report_metric(sample)
    observer.report_metric(MetricSample.model_validate_json(sample.model_dump_json()))
    # Then both deliveries carry the same key and the sample under "metric"
    first, second = receiver.deliveries
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert first.headers["Idempotency-Key"] == metric_idempotency_key(sample)
    assert json.loads(first.body) == {"metric": sample.model_dump(mode="json")}
    # And another sample gets another key
    other = sample.model_copy(update={"labels": {"t": "t-2"}})
    assert metric_idempotency_key(other) != metric_idempotency_key(sample)


@pytest.mark.parametrize(
    "bad",
    [
        {"url": "ftp://127.0.0.1/hook"},
        {"url": "127.0.0.1/hook"},
        {"url": "http:///hook"},
        {"url": "http://127.0.0.1/hook", "attempts": 0},
        {"url": "http://127.0.0.1/hook", "attempts": 11},
        {"url": "http://127.0.0.1/hook", "timeout": 0},
        {"url": "http://127.0.0.1/hook", "headers": {"Bad Name": "x"}},
        {"url": "http://127.0.0.1/hook", "headers": {"X-A": "a\r\nX-B: b"}},
        {"url": "http://127.0.0.1/hook", "unknown": True},
    ],
)
def test_webhook_config_refuses_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        WebhookConfig.model_validate(bad)


# -- prometheus -------------------------------------------------------------------------------

#: One worker process: imports prometheus_client first (as Celery or flower would), then
#: observes through two observer instances, including a redelivered event.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import prometheus_client  # imported before configure: values must still go to files
    from prometheus_client import values

    from plugins.observers.prometheus import PrometheusObserver
    from schemas.events import Event
    from schemas.plugins import MetricSample
    from workers.runtime.errors import PermanentError
    from workers.plugin_api import PluginContext
    from workers.runtime.settings import Settings

    data_dir, prom_dir, count, duration, gauge = sys.argv[1:6]
    settings = Settings(data_dir=Path(data_dir), prometheus_dir=Path(prom_dir))
    ctx = PluginContext("prometheus", "1.0.0", Path(data_dir) / "plugins", settings)
    first, second = PrometheusObserver(None, ctx), PrometheusObserver(None, ctx)
    for i in range(int(count)):
        (first if i % 2 else second).observe_event(Event(event_type="step.started"))
    first.observe_event(Event(
        event_type="workflow.succeeded", workflow_id="wf", subject="signup",
        data={"kind": "signup", "status": "succeeded", "duration_seconds": float(duration)},
    ))
    first.observe_event(Event(event_type="step.failed", subject="cul8er.steps.dns"))
    changed = Event(event_type="tenant.status_changed", data={"from": "new", "to": "active"})
    first.observe_event(changed)
    second.observe_event(changed)  # redelivered: counted once in this process
    sample = MetricSample(name="jobs", value=2, kind="counter", labels={"q": "a"})
    first.report_metric(sample)
    first.report_metric(sample)
    if gauge != "-":
        first.report_metric(MetricSample(name="queue_depth", value=float(gauge)))
    try:
        first.report_metric(MetricSample(name="jobs", value=-1, kind="counter"))
        refused = False
    except PermanentError:
        refused = True
    print(json.dumps({
        "pid": os.getpid(),
        "multiprocess": values.ValueClass._multiprocess,
        "healthy": first.health_status().healthy,
        "refused_negative": refused,
    }))
    """
)


def run_children(tmp_path: Path, prom_dir: Path, *argvs: list[str]) -> list[dict[str, Any]]:
    """Start one child per argv at once; their JSON answers once all exited."""
    env = {k: v for k, v in os.environ.items() if k != metrics.ENV_VAR}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(prom_dir), *argv],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    answers = []
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        answers.append(json.loads(out.strip().splitlines()[-1]))
    return answers


def series(metric: str, /, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The key of one sample in :func:`samples`."""
    return metric, tuple(sorted(labels.items()))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_prometheus_sums_two_processes(tmp_path: Path) -> None:
    # Given two worker processes observing into one multi-process folder at the same time
    prom_dir = tmp_path / "prom"
    answers = run_children(tmp_path, prom_dir, ["3", "2.0", "-"], ["4", "40.0", "9"])
    # Then each wrote multi-process values although prometheus_client was imported first
    assert all(a["multiprocess"] and a["healthy"] and a["refused_negative"] for a in answers)
    assert len(list(prom_dir.glob("counter_*.db"))) == 2
    # When the folder is rendered
    got = samples(metrics.render(prom_dir).decode())
    # Then the counters are summed over both processes (3 + 4 = 7)
    assert got[series("cul8er_events_total", event_type="step.started")] == 7
    assert got[series("cul8er_events_total", event_type="workflow.succeeded")] == 2
    assert got[series("cul8er_events_total", event_type="tenant.status_changed")] == 2
    assert got[series("cul8er_step_failures_total", step="cul8er.steps.dns")] == 2
    assert got[series("cul8er_tenant_transitions_total", to="active")] == 2
    # And the workflow histogram holds both durations (2 s and 40 s)
    wf = {"kind": "signup", "status": "succeeded"}
    assert got[series("cul8er_workflow_duration_seconds_count", **wf)] == 2
    assert got[series("cul8er_workflow_duration_seconds_sum", **wf)] == 42
    assert got[series("cul8er_workflow_duration_seconds_bucket", le="2.5", **wf)] == 1
    assert got[series("cul8er_workflow_duration_seconds_bucket", le="30.0", **wf)] == 1
    assert got[series("cul8er_workflow_duration_seconds_bucket", le="60.0", **wf)] == 2
    # And reported samples: a redelivered counter sample counted once per process, the gauge
    assert got[series("cul8er_metric_counter_total", name="jobs", labels="q=a")] == 4
    assert got[series("cul8er_metric", name="queue_depth", labels="")] == 9

    # When the exporter serves the folder on a free loopback port
    server = metrics.serve(0, prom_dir)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as response:
            served = samples(response.read().decode())
    finally:
        server.shutdown()
        server.server_close()
    # Then a scrape answers the same values
    assert served == got

    # When both processes are marked dead
    for answer in answers:
        metrics.mark_process_dead(answer["pid"], prom_dir)
    # Then their counters still count
    assert samples(metrics.render(prom_dir).decode()) == got


def test_prometheus_clear_empties_the_folder(tmp_path: Path) -> None:
    # Given a folder one process wrote to
    prom_dir = tmp_path / "prom"
    run_children(tmp_path, prom_dir, ["1", "1.0", "-"])
    assert list(prom_dir.glob("*.db"))
    # When it is cleared (before workers start)
    metrics.clear(prom_dir)
    # Then nothing is left to render
    assert not list(prom_dir.glob("*.db"))
    assert b"cul8er_events_total" not in metrics.render(prom_dir)


def test_prometheus_directory_defaults_under_data_dir(tmp_path: Path) -> None:
    # Given settings with and without a prometheus folder
    default = Settings(data_dir=tmp_path)
    chosen = Settings(data_dir=tmp_path, prometheus_dir=tmp_path / "elsewhere")
    # Then the folder is under data_dir unless one is set
    assert metrics.metrics_directory(default) == tmp_path.resolve() / "prometheus"
    assert metrics.metrics_directory(chosen) == (tmp_path / "elsewhere").resolve()
