"""The embedded broker: only an owner starts it, it dies with its owner, clients never start one.

Real processes throughout: a fresh interpreter importing ``workers.app``, an owner process
SIGKILLed while its server runs, the CLI and a celery worker with no broker running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from tests.stack import ROOT
from workers.runtime.embedded import EmbeddedRedis, die_with_parent
from workers.runtime.errors import ConfigError
from workers.runtime.waiting import wait_until

#: An owner: starts the server, says so, and sleeps until it is killed.
OWNER = """
import sys, time
from pathlib import Path
from workers.runtime.embedded import EmbeddedRedis
server = EmbeddedRedis(Path(sys.argv[1])).start()
print("server", server.pid, flush=True)
time.sleep(300)
"""


def redis_servers(data_dir: Path) -> list[psutil.Process]:
    """Live redis-server processes serving ``data_dir`` (by socket path or working folder)."""
    embedded = EmbeddedRedis(data_dir)
    found = []
    for process in psutil.process_iter(["name", "cmdline", "cwd", "status"]):
        info = process.info
        if info["status"] == psutil.STATUS_ZOMBIE or "redis-server" not in (info["name"] or ""):
            continue
        command = " ".join(info["cmdline"] or [])
        if str(embedded.socket_path) in command or info["cwd"] == str(embedded.folder):
            found.append(process)
    return found


def env_for(data_dir: Path) -> dict[str, str]:
    """The environment of a cul8er process on the embedded default, with no other settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
    env.update(CUL8ER_DATA_DIR=str(data_dir), CUL8ER_LOG_FORMAT="json")
    return env


def test_importing_the_app_starts_no_broker(tmp_path: Path) -> None:
    # Given no broker settings at all: the embedded default
    data_dir = tmp_path / "var"
    # When a fresh interpreter imports the composition root and reads its configuration
    done = subprocess.run(
        [sys.executable, "-c", "from workers.app import app; print(app.conf.broker_url)"],
        env=env_for(data_dir),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then the app points at the embedded socket
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == EmbeddedRedis(data_dir).url
    # and no server was started for it, not even for a moment
    assert redis_servers(data_dir) == []
    assert not (data_dir / "redis").exists()


def test_a_sigkilled_owner_takes_its_server_with_it(tmp_path: Path) -> None:
    # Given a process that started the embedded broker and holds it
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert owner.stdout is not None
        said = next(line for line in owner.stdout if line.startswith("server "))
        server_pid = int(said.split()[1])
        assert EmbeddedRedis(tmp_path).is_running()
        assert [p.pid for p in redis_servers(tmp_path)] == [server_pid]
    finally:
        # When the owner is SIGKILLed: no cleanup of its own runs
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
    # Then the server is gone within seconds, its queue flushed to disk
    wait_until(
        lambda: not redis_servers(tmp_path),
        timeout=5,
        message=lambda: f"still running: {redis_servers(tmp_path)}",
        error=AssertionError,
    )
    assert not EmbeddedRedis(tmp_path).is_running()
    assert "ready to exit" in (tmp_path / "redis" / "redis.log").read_text()


def test_one_owner_at_a_time_and_stop_ends_it(tmp_path: Path) -> None:
    broker = EmbeddedRedis(tmp_path)
    # Given a server this process started
    with broker.start() as server:
        assert broker.is_running() and broker.pid() == server.pid
        # Then a second owner is refused, naming the one that runs
        with pytest.raises(ConfigError, match=f"already running \\(pid {server.pid}\\)"):
            broker.start()
        # and a client finds it running
        broker.require_running()
    # When the block ends the server has exited and been waited for
    assert server.process.returncode is not None
    assert not broker.is_running() and redis_servers(tmp_path) == []
    # and a client now gets the error that says what to run
    with pytest.raises(ConfigError, match="not running .* `cul8er up`"):
        broker.require_running()


def test_only_the_main_thread_may_own_the_server(tmp_path: Path) -> None:
    # The death signal follows the thread that forked the server: a thread's exit would kill it.
    caught: list[BaseException] = []

    def start() -> None:
        try:
            EmbeddedRedis(tmp_path).start()
        except ConfigError as exc:
            caught.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    assert [str(e) for e in caught] == ["the embedded broker must be started from the main thread"]
    assert redis_servers(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_die_with_parent_arms_the_death_signal() -> None:
    # A child started with it reports the signal it will get when we die (prctl option 2 reads it)
    probe = (
        "import ctypes; v = ctypes.c_int(); "
        "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        preexec_fn=die_with_parent(signal.SIGTERM),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == str(int(signal.SIGTERM))


def test_a_client_with_no_broker_running_gets_a_clear_error_and_starts_none(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "var"
    env = env_for(data_dir)
    # When the CLI is asked to change something and no `cul8er up` runs
    made = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "tenant", "create", "Nobody", "--plan", "free"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then it exits 2 saying the broker is not running and how to start it
    assert made.returncode == 2, made.stderr
    assert "config_error: the embedded broker of" in made.stderr
    assert "is not running" in made.stderr and "`cul8er up`" in made.stderr
    # When a celery worker starts on the missing broker
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then it stops at once with the same reason instead of retrying forever
    assert worker.returncode != 0
    assert "is not running" in worker.stderr and "`cul8er up`" in worker.stderr
    # and neither started a server
    assert redis_servers(data_dir) == [] and not (data_dir / "redis").exists()
