"""The small HTTP service each local instance runs, on 127.0.0.1 only.

Run as ``python -m plugins.platforms.instance_server --name NAME --dir DIR``.
With ``--port 0`` it binds a free port and writes it to ``DIR/port``
atomically, which is how the local platform learns that the instance is up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import structlog

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

__all__ = ["InstanceServer", "main"]

log = structlog.get_logger(__name__)

#: The only address an instance listens on.
HOST = "127.0.0.1"
#: The longest ``/burn`` accepts (seconds).
MAX_BURN_SECONDS = 60.0


class _CountingWriter:
    """A write-only stream that counts the bytes passing through it."""

    def __init__(self, inner: Any, server: InstanceServer) -> None:
        self._inner = inner
        self._server = server

    def write(self, data: bytes) -> int:
        """Write ``data`` and count it as sent."""
        written = self._inner.write(data)
        self._server.count(tx=len(data))
        return int(written) if written is not None else len(data)

    def flush(self) -> None:
        """Flush the underlying stream."""
        self._inner.flush()

    def close(self) -> None:
        """Close the underlying stream."""
        self._inner.close()

    @property
    def closed(self) -> bool:
        """Whether the underlying stream is closed."""
        return bool(self._inner.closed)


class InstanceServer(ThreadingHTTPServer):
    """A threading HTTP server that keeps request and byte counters."""

    daemon_threads = True

    def __init__(self, port: int, *, name: str, unhealthy: bool) -> None:
        self.instance_name = name
        self.unhealthy = unhealthy
        self.started_at = datetime.now(UTC).isoformat()
        self.requests = 0
        #: Of ``requests``, those that were cul8er's own probes (``/health``, ``/metrics``):
        #: metering leaves them out, so watching a tenant never bills it.
        self.probe_requests = 0
        self.rx_bytes = 0
        self.tx_bytes = 0
        self._lock = threading.Lock()
        super().__init__((HOST, port), _Handler)

    def count(self, *, requests: int = 0, probes: int = 0, rx: int = 0, tx: int = 0) -> None:
        """Add to the counters (thread-safe)."""
        with self._lock:
            self.requests += requests
            self.probe_requests += probes
            self.rx_bytes += rx
            self.tx_bytes += tx

    def metrics(self) -> dict[str, Any]:
        """A snapshot of the counters."""
        with self._lock:
            return {
                "requests": self.requests,
                "probe_requests": self.probe_requests,
                "rx_bytes": self.rx_bytes,
                "tx_bytes": self.tx_bytes,
                "started_at": self.started_at,
            }


class _Handler(BaseHTTPRequestHandler):
    """Serves ``/health``, ``/metrics``, ``/burn`` and ``/``."""

    server: InstanceServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.wfile = _CountingWriter(self.wfile, self.server)  # type: ignore[assignment]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Keep request logging quiet; errors still reach stderr."""

    def do_GET(self) -> None:
        """Answer one GET request."""
        requestline: bytes = getattr(self, "raw_requestline", b"")
        received = len(requestline) + sum(
            len(key) + len(value) + 4 for key, value in self.headers.items()
        )
        url = urlsplit(self.path)
        probe = int(url.path in ("/health", "/metrics"))
        self.server.count(requests=1, probes=probe, rx=received + 2)
        if url.path == "/health":
            if self.server.unhealthy:
                self._send_json(503, {"status": "unhealthy", "name": self.server.instance_name})
            else:
                self._send_json(200, {"status": "ok", "name": self.server.instance_name})
        elif url.path == "/metrics":
            self._send_json(200, self.server.metrics())
        elif url.path == "/burn":
            self._burn(parse_qs(url.query))
        elif url.path == "/":
            self._send(200, f"cul8er instance {self.server.instance_name}\n".encode(), "text/plain")
        else:
            self._send_json(404, {"error": "not found", "path": url.path})

    def _burn(self, query: dict[str, list[str]]) -> None:
        try:
            seconds = float(query.get("seconds", ["1"])[0])
        except ValueError:
            self._send_json(400, {"error": "seconds must be a number"})
            return
        seconds = max(0.0, min(seconds, MAX_BURN_SECONDS))
        deadline = time.process_time() + seconds
        wall_deadline = time.monotonic() + seconds * 20
        spins = 0
        # Burn CPU time, not wall time: a CPU quota stretches the wall clock, which is the point.
        while time.process_time() < deadline and time.monotonic() < wall_deadline:
            spins += 1
        self._send_json(200, {"burned_seconds": seconds, "spins": spins})

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _write_port(directory: Path, port: int) -> None:
    """Write ``port`` to ``directory/port`` so a reader never sees a partial file."""
    tmp = directory / f"port.{os.getpid()}.tmp"
    tmp.write_text(f"{port}\n")
    os.replace(tmp, directory / "port")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A cul8er local instance's HTTP service.")
    parser.add_argument("--name", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--unhealthy", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the instance service until SIGTERM or SIGINT."""
    args = _parse(argv)
    stopping = threading.Event()

    def _stop_early(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _stop_early)
    if args.startup_delay > 0 and stopping.wait(args.startup_delay):
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    server = InstanceServer(args.port, name=args.name, unhealthy=args.unhealthy)

    def _shutdown(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever() to return, so it cannot run on this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    port = server.server_address[1]
    _write_port(args.dir, port)
    log.info("instance_server_listening", name=args.name, host=HOST, port=port, pid=os.getpid())
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    log.info("instance_server_stopped", name=args.name, pid=os.getpid())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
