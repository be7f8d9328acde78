"""The small HTTP service each local instance runs, on 127.0.0.1 only.

Run as ``python -m plugins.platforms.instance_server --name NAME --dir DIR``.
With ``--port 0`` it binds a free port and writes it to ``DIR/port``
atomically, which is how the local platform learns that the instance is up.

Release settings make a version good or bad on purpose, so deployments can be tested
against real processes. ``--version``, ``--error-rate`` and ``--latency-ms`` default to
``CUL8ER_RELEASE_VERSION``, ``CUL8ER_RELEASE_ERROR_RATE`` and ``CUL8ER_RELEASE_LATENCY_MS``
(what ``schemas.delivery.ReleaseSettings.env()`` sets). ``/`` and ``/health`` first wait
``latency_ms``, then may answer 500. Errors are not random: each of the two paths keeps its
own count, and after its n-th request exactly ``floor(n * error_rate)`` of them were 500s
(0.5 fails every other request, 0.25 every fourth, 0.3 three in each ten). Counting per path
keeps ``/health`` probes from shifting which requests to ``/`` fail. ``/version`` answers
``{"name", "version"}`` at once and never fails, and every answer carries the header
``X-Cul8er-Version``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import threading
import time
from datetime import UTC, datetime
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import structlog

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import FrameType

__all__ = ["InstanceServer", "main"]

log = structlog.get_logger(__name__)

#: The only address an instance listens on.
HOST = "127.0.0.1"
#: The longest ``/burn`` accepts (seconds).
MAX_BURN_SECONDS = 60.0
#: The most ``--latency-ms`` accepts, as ``schemas.delivery.ReleaseSettings`` does.
MAX_LATENCY_MS = 60_000.0
#: What a version may look like (``schemas.delivery.Version``); it goes into a header.
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
#: The header every answer names the running version in.
VERSION_HEADER = "X-Cul8er-Version"
#: The paths that ``latency_ms`` delays and ``error_rate`` fails.
FAULTY_PATHS = ("/", "/health")
#: The paths cul8er itself reads: counted as ``probe_requests``, which metering leaves out.
PROBE_PATHS = ("/health", "/metrics", "/version")


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


def check_version(value: str) -> str:
    """``value`` if it is a valid release version, else ``ValueError``."""
    if not VERSION_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a version (letters, digits, '._+-', up to 64)")
    return value


def check_error_rate(value: float) -> float:
    """``value`` if it is a share of requests (0 to 1), else ``ValueError``."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{value!r} is not between 0 and 1")
    return value


def check_latency_ms(value: float) -> float:
    """``value`` if it is a delay in milliseconds we accept, else ``ValueError``."""
    if not 0.0 <= value <= MAX_LATENCY_MS:
        raise ValueError(f"{value!r} is not between 0 and {MAX_LATENCY_MS:g}")
    return value


class InstanceServer(ThreadingHTTPServer):
    """A threading HTTP server that keeps request and byte counters."""

    daemon_threads = True

    def __init__(
        self,
        port: int,
        *,
        name: str,
        unhealthy: bool,
        version: str = "0",
        error_rate: float = 0.0,
        latency_ms: float = 0.0,
    ) -> None:
        self.instance_name = name
        self.unhealthy = unhealthy
        self.version = check_version(version)
        self.error_rate = check_error_rate(error_rate)
        self.latency_ms = check_latency_ms(latency_ms)
        # An exact fraction, so 0.5 means every other request, not "almost".
        self._error_fraction = Fraction(error_rate).limit_denominator(1_000_000)
        self.started_at = datetime.now(UTC).isoformat()
        self.requests = 0
        #: Of ``requests``, those that were cul8er's own probes (``/health``, ``/metrics``,
        #: ``/version``): metering leaves them out, so watching a tenant never bills it.
        self.probe_requests = 0
        #: 500s served because of ``error_rate``.
        self.errors = 0
        self.rx_bytes = 0
        self.tx_bytes = 0
        self._faulty_seen = dict.fromkeys(FAULTY_PATHS, 0)
        self._lock = threading.Lock()
        super().__init__((HOST, port), _Handler)

    def count(
        self, *, requests: int = 0, probes: int = 0, errors: int = 0, rx: int = 0, tx: int = 0
    ) -> None:
        """Add to the counters (thread-safe)."""
        with self._lock:
            self.requests += requests
            self.probe_requests += probes
            self.errors += errors
            self.rx_bytes += rx
            self.tx_bytes += tx

    def should_fail(self, path: str) -> bool:
        """Whether this request to ``path`` gets a 500; see the module docstring."""
        rate = self._error_fraction
        with self._lock:
            seen = self._faulty_seen[path] = self._faulty_seen[path] + 1
        # After n requests exactly floor(n * rate) failed: fail when this one raises the floor.
        before = (seen - 1) * rate.numerator // rate.denominator
        return seen * rate.numerator // rate.denominator > before

    def metrics(self) -> dict[str, Any]:
        """A snapshot of the counters."""
        with self._lock:
            return {
                "requests": self.requests,
                "probe_requests": self.probe_requests,
                "errors": self.errors,
                "rx_bytes": self.rx_bytes,
                "tx_bytes": self.tx_bytes,
                "started_at": self.started_at,
                "version": self.version,
                "error_rate": self.error_rate,
                "latency_ms": self.latency_ms,
            }


class _Handler(BaseHTTPRequestHandler):
    """Serves ``/health``, ``/metrics``, ``/version``, ``/burn`` and ``/``."""

    server: InstanceServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.wfile = _CountingWriter(self.wfile, self.server)  # type: ignore[assignment]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Keep request logging quiet; errors still reach stderr."""

    def end_headers(self) -> None:
        """Name the version on every answer, ``send_error``'s included."""
        self.send_header(VERSION_HEADER, self.server.version)
        super().end_headers()

    def do_GET(self) -> None:
        """Answer one GET request."""
        requestline: bytes = getattr(self, "raw_requestline", b"")
        received = len(requestline) + sum(
            len(key) + len(value) + 4 for key, value in self.headers.items()
        )
        url = urlsplit(self.path)
        probe = int(url.path in PROBE_PATHS)
        self.server.count(requests=1, probes=probe, rx=received + 2)
        if url.path in FAULTY_PATHS and self._inject_faults(url.path):
            return
        if url.path == "/health":
            if self.server.unhealthy:
                self._send_json(503, {"status": "unhealthy", "name": self.server.instance_name})
            else:
                self._send_json(200, {"status": "ok", "name": self.server.instance_name})
        elif url.path == "/metrics":
            self._send_json(200, self.server.metrics())
        elif url.path == "/version":
            self._send_json(
                200, {"name": self.server.instance_name, "version": self.server.version}
            )
        elif url.path == "/burn":
            self._burn(parse_qs(url.query))
        elif url.path == "/":
            body = f"cul8er instance {self.server.instance_name} version {self.server.version}\n"
            self._send(200, body.encode(), "text/plain")
        else:
            self._send_json(404, {"error": "not found", "path": url.path})

    def _inject_faults(self, path: str) -> bool:
        """Wait ``latency_ms``, then maybe answer 500; ``True`` when the answer is sent."""
        if self.server.latency_ms > 0:
            time.sleep(self.server.latency_ms / 1000)
        if not self.server.should_fail(path):
            return False
        self.server.count(errors=1)
        self._send_json(
            500,
            {
                "error": "injected error",
                "name": self.server.instance_name,
                "version": self.server.version,
            },
        )
        return True

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


def _number(check: Callable[[float], float]) -> Callable[[str], float]:
    """An argparse type: a finite float that passes ``check``."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _version(text: str) -> str:
    try:
        return check_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: Release options: (option, argparse dest, environment variable, type, default).
_RELEASE_OPTIONS: tuple[tuple[str, str, str, Callable[[str], Any], str], ...] = (
    ("--version", "version", "CUL8ER_RELEASE_VERSION", _version, "0"),
    ("--error-rate", "error_rate", "CUL8ER_RELEASE_ERROR_RATE", _number(check_error_rate), "0"),
    ("--latency-ms", "latency_ms", "CUL8ER_RELEASE_LATENCY_MS", _number(check_latency_ms), "0"),
)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A cul8er local instance's HTTP service.")
    parser.add_argument("--name", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--unhealthy", action="store_true")
    for option, _dest, env, convert, default in _RELEASE_OPTIONS:
        parser.add_argument(
            option, type=convert, default=None, help=f"default: ${env}, else {default}"
        )
    args = parser.parse_args(argv)
    for option, dest, env, convert, default in _RELEASE_OPTIONS:
        if getattr(args, dest) is not None:
            continue
        raw = os.environ.get(env, "").strip() or default
        try:
            setattr(args, dest, convert(raw))
        except argparse.ArgumentTypeError as exc:
            # parser.error exits 2, naming the option and where its value came from.
            parser.error(f"argument {option} (from ${env}): {exc}")
    return args


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
    server = InstanceServer(
        args.port,
        name=args.name,
        unhealthy=args.unhealthy,
        version=args.version,
        error_rate=args.error_rate,
        latency_ms=args.latency_ms,
    )

    def _shutdown(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever() to return, so it cannot run on this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    port = server.server_address[1]
    _write_port(args.dir, port)
    log.info(
        "instance_server_listening",
        name=args.name,
        host=HOST,
        port=port,
        pid=os.getpid(),
        version=args.version,
        error_rate=args.error_rate,
        latency_ms=args.latency_ms,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    log.info("instance_server_stopped", name=args.name, pid=os.getpid())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
