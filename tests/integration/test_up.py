"""`cul8er up` on the embedded default: nothing but Python packages, start to clean stop.

`up` owns the embedded broker: it starts it, stops it last, and, however `up` dies, the
broker and the processes `up` started die with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from celery import Celery

from schemas.states import RunStatus
from tests.stack import ROOT, instance_processes
from workers.runtime.embedded import EmbeddedRedis
from workers.runtime.settings import Settings
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def embedded_env(data_dir: Path) -> dict[str, str]:
    """A cul8er environment with a data dir and no broker or database settings at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
    env.update(CUL8ER_DATA_DIR=str(data_dir), CUL8ER_LOG_FORMAT="json")
    return env


def start_up(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`cul8er up` with ``args``, its stderr in ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli.main", "up", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),  # noqa: SIM115 - the child writes it
    )


def processes_of(data_dir: Path) -> list[psutil.Process]:
    """Live processes of a data dir: named in their command line or set in their environment.

    What each one was is read once, here (``process.info``): a process may exit a moment later, and
    asking it again then raises ``NoSuchProcess``.
    """
    found = []
    for process in psutil.process_iter(["name", "cmdline", "environ", "status"]):
        info = process.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        command = " ".join(info["cmdline"] or [])
        environ = info["environ"] or {}
        if str(data_dir) in command or environ.get("CUL8ER_DATA_DIR") == str(data_dir):
            found.append(process)
    return found


def redis_servers(data_dir: Path) -> list[psutil.Process]:
    """Live redis-server processes of a data dir."""
    return [p for p in processes_of(data_dir) if "redis-server" in p.info["name"]]


def test_up_runs_the_embedded_stack_and_stops_cleanly(tmp_path: Path) -> None:
    # Given a data dir and no broker or database settings at all
    env = embedded_env(tmp_path / "var")
    port = free_port()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "workers.cli.main", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )

    # When `cul8er up --flower` starts
    up = start_up(env, tmp_path / "up.log", "--flower", "--flower-port", str(port))
    try:
        # Then a tenant can be created through the CLI and becomes active (the CLI says the
        # broker is not running, exit code 2, until `up` has started it)
        create = (
            *("tenant", "create", "Up Co", "--plan", "free", "--tenant-id", "upco"),
            *("--wait", "--json", "--timeout", "120"),
        )
        tries: list[subprocess.CompletedProcess[str]] = []

        def created() -> bool:
            tries.append(cli(*create))
            return tries[-1].returncode == 0

        wait_until(
            created, timeout=90, interval=1, message=lambda: tries[-1].stderr, error=AssertionError
        )
        assert json.loads(tries[-1].stdout)["status"] == RunStatus.SUCCEEDED
        # and, HAProxy being installed, `up` runs it: the tenant has a stable entry point
        shown = json.loads(cli("tenant", "show", "upco", "--json").stdout)
        if shutil.which("haproxy"):
            assert shown["entry"] and shown["entry"].startswith("127.0.0.1:"), shown
            with urllib.request.urlopen(f"http://{shown['entry']}/health", timeout=10) as answer:
                assert answer.status == 200
        # and plain celery inspect and Flower see the worker
        pong = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "workers.app", "inspect", "ping"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "pong" in pong.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200
        assert cli("tenant", "delete", "upco", "--wait").returncode == 0
    finally:
        # When it gets SIGTERM
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    # Then worker, beat, Flower and the embedded broker are all gone
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-2000:]
    assert not EmbeddedRedis((tmp_path / "var").resolve()).is_running()
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []
    assert instance_processes((tmp_path / "var").resolve()) == []
    haproxy_folder = str(Settings(data_dir=tmp_path / "var").haproxy_folder)
    assert [
        p
        for p in psutil.process_iter(["cmdline"])
        if haproxy_folder in " ".join(p.info["cmdline"] or [])
    ] == []


def test_a_sigkilled_up_leaves_no_broker_and_no_worker_behind(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    embedded = EmbeddedRedis(data_dir)
    # Given `cul8er up` running with its broker answering and its worker ready
    up = start_up(embedded_env(data_dir), tmp_path / "up.log", "--no-sandbox", "--concurrency", "1")
    client = Celery("probe", broker=embedded.url)

    def ready() -> bool:
        assert up.poll() is None, (tmp_path / "up.log").read_text()[-2000:]
        return embedded.is_running() and bool(client.control.ping(timeout=1))

    try:
        wait_until(
            ready,
            timeout=120,
            interval=0.5,
            message=lambda: (tmp_path / "up.log").read_text()[-2000:],
            error=AssertionError,
        )
        assert redis_servers(data_dir), processes_of(data_dir)
        assert len(processes_of(data_dir)) >= 3  # broker, worker, beat (and the pool child)
    finally:
        client.close()
        # When it is SIGKILLed: no cleanup of its own can run
        up.send_signal(signal.SIGKILL)
        up.wait(timeout=10)
    # Then its redis-server is gone within seconds
    wait_until(
        lambda: not redis_servers(data_dir),
        timeout=5,
        message=lambda: f"redis-server still running: {redis_servers(data_dir)}",
        error=AssertionError,
    )
    assert not embedded.is_running()
    # and so are the worker and beat it had started, after their warm shutdown
    wait_until(
        lambda: not processes_of(data_dir),
        timeout=60,
        interval=0.5,
        message=lambda: f"still running: {[p.info['cmdline'] for p in processes_of(data_dir)]}",
        error=AssertionError,
    )
