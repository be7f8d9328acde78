"""`cul8er up` on the embedded default: nothing but Python packages, start to clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.stack import ROOT, instance_processes
from workers.runtime.embedded import EmbeddedRedis

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_up_runs_the_embedded_stack_and_stops_cleanly(tmp_path: Path) -> None:
    # Given a data dir and no broker or database settings at all
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
    env.update(CUL8ER_DATA_DIR=str(tmp_path / "var"), CUL8ER_LOG_FORMAT="json")
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
    up = subprocess.Popen(
        [sys.executable, "-m", "workers.cli.main", "up", "--flower", "--flower-port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "up.log").open("wb"),  # noqa: SIM115 - the child writes it
    )
    try:
        # Then a tenant can be created through the CLI and becomes active
        made = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            made = cli(
                "tenant",
                "create",
                "Up Co",
                "--plan",
                "free",
                "--tenant-id",
                "upco",
                "--wait",
                "--json",
                "--timeout",
                "120",
            )
            if made.returncode == 0:
                break
            time.sleep(1)
        assert made is not None and made.returncode == 0, made and made.stderr
        assert json.loads(made.stdout)["status"] == "succeeded"
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
