"""``cul8er up`` and ``cul8er down``: run the stack on this machine, and stop a leftover broker.

``up`` owns the embedded broker's life (:mod:`workers.runtime.embedded`): it starts it
before anything else and stops it after everything else, and the broker dies with ``up``
however ``up`` ends. The worker, beat, sandbox and Flower it runs die with it the same way.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer

from workers.cli.console import complain, console
from workers.runtime.embedded import EmbeddedRedis, EmbeddedServer, die_with_parent
from workers.runtime.queues import WORKER_QUEUES
from workers.runtime.settings import get_settings

if TYPE_CHECKING:
    from workers.runtime.settings import Settings

__all__ = ["down", "haproxy_command", "stack_cli", "up", "worker_commands"]

#: Holds ``up`` and ``down``; ``cul8er`` adds them without a group name.
stack_cli = typer.Typer()

#: How long a child may take to stop on SIGTERM before it is killed (seconds).
CHILD_STOP_TIMEOUT: Final = 30.0
#: How often ``up`` checks that its children still run (seconds).
SUPERVISE_INTERVAL: Final = 0.5


def worker_commands(
    settings: Settings,
    *,
    concurrency: int,
    sandbox: bool,
    flower_port: int | None,
    api: bool = False,
) -> dict[str, list[str]]:
    """The processes ``up`` runs, by name: worker, beat, the sandbox, Flower and the HTTP API
    if asked."""
    celery = [sys.executable, "-m", "celery", "-A", "workers.app"]
    level = ["--loglevel", settings.log_level]

    def worker(queues: str, processes: int, node: str) -> list[str]:
        return [*celery, "worker", "-Q", queues, "-c", str(processes), "-n", node, *level]

    commands = {}
    balancer = haproxy_command(settings)
    if balancer is not None:
        # Tenants' entry points: before the worker, which configures it as tenants come.
        commands["haproxy"] = balancer
    commands |= {
        "worker": worker(WORKER_QUEUES, concurrency, "cul8er@%h"),
        "beat": [*celery, "beat", *level],
    }
    if sandbox:
        # Untrusted plugins only ever run here, under the sandbox's time, memory and CPU limits.
        commands["sandbox"] = worker(settings.sandbox_queue, 1, "cul8er-sandbox@%h")
    if flower_port is not None:
        commands["flower"] = [*celery, "flower", "--address=127.0.0.1", f"--port={flower_port}"]
    if api:
        commands["api"] = [sys.executable, "-m", "workers.cli.main", "api", "serve"]
    return commands


def haproxy_command(settings: Settings) -> list[str] | None:
    """HAProxy for tenants' entry points, when it is the load balancer and is installed."""
    if settings.load_balancer != "haproxy" or shutil.which(settings.haproxy_binary) is None:
        return None
    return [
        sys.executable,
        "-m",
        "plugins.load_balancers.haproxy",
        "serve",
        "--dir",
        str(settings.haproxy_folder),
        "--binary",
        settings.haproxy_binary,
    ]


@contextlib.contextmanager
def _embedded_broker(settings: Settings) -> Iterator[EmbeddedServer | None]:
    """The embedded broker for the ``with`` block, when the settings name no broker."""
    if not settings.embedded_broker:
        yield None
        return
    with EmbeddedRedis(settings.data_dir).start() as server:
        yield server


def _spawn(commands: dict[str, list[str]]) -> dict[str, subprocess.Popen[bytes]]:
    """Start each command as a child that gets SIGTERM when ``up`` dies, however it dies."""
    return {
        name: subprocess.Popen(command, preexec_fn=die_with_parent(signal.SIGTERM))
        for name, command in commands.items()
    }


def _supervise(children: dict[str, subprocess.Popen[bytes]]) -> int:
    """Wait for SIGTERM or SIGINT (0) or for a child to exit on its own (1)."""
    stopping = False
    code = 0

    def _stop(*_args: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                complain((f"{name} exited with {child.returncode}", "red"))
                stopping, code = True, 1
        time.sleep(SUPERVISE_INTERVAL)
    return code


def _stop_children(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every child still running, then wait; SIGKILL one that does not stop."""
    for child in children.values():
        if child.poll() is None:
            child.terminate()
    for child in children.values():
        try:
            child.wait(timeout=CHILD_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@stack_cli.command()
def up(
    flower: Annotated[bool, typer.Option(help="Also run Flower on 127.0.0.1.")] = False,
    flower_port: int = 5555,
    concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    sandbox: Annotated[
        bool, typer.Option(help="Also run the sandbox worker for untrusted plugins.")
    ] = True,
    api: Annotated[
        bool, typer.Option(help="Also serve the HTTP API (/api/v1) on CUL8ER_API_HOST:PORT.")
    ] = False,
) -> None:
    """Run a worker and beat (and Flower, and the HTTP API) on the configured broker and
    database."""
    from workers.runtime.migrate import upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    commands = worker_commands(
        settings,
        concurrency=concurrency,
        sandbox=sandbox,
        flower_port=flower_port if flower else None,
        api=api,
    )
    # The broker first and last: the children connect to it, and it outlives them.
    with _embedded_broker(settings):
        upgrade(settings.sqlalchemy_url)
        children = _spawn(commands)
        try:
            complain(
                ("cul8er up", "green"),
                f": {', '.join(children)} running; data in {settings.data_dir}",
            )
            if flower:
                complain(f"Flower: http://127.0.0.1:{flower_port}")
            if api:
                complain(f"API: http://{settings.api_host}:{settings.api_port}/api/v1/docs")
            if "haproxy" not in children and settings.load_balancer == "haproxy":
                complain(
                    (f"{settings.haproxy_binary} not found", "yellow"),
                    ": tenants are reached at their instances' own addresses and deployments "
                    "that shift traffic are refused (scripts/setup.sh services installs HAProxy)",
                )
            code = _supervise(children)
        finally:
            _stop_children(children)
    raise typer.Exit(code)


@stack_cli.command()
def down() -> None:
    """Stop the embedded broker (workers should be stopped first)."""
    stopped = EmbeddedRedis(get_settings().data_dir).stop()
    console.print("embedded broker stopped" if stopped else "embedded broker was not running")
