"""A bounded, loopback-only HTTP load generator for tests and benchmarks.

``LoadGenerator`` sends GET requests on an open-loop schedule: request ``i`` is due at
``start + i / rate`` whatever happened to the ones before, so a slow server shows up as
latency and failures instead of quietly lowering the load. A small thread pool bounds the
requests in flight; when every worker is busy at a request's due time, the request is
recorded as skipped rather than queued, so a stuck server never piles up work here.

Only loopback targets are accepted (an IP literal such as ``127.0.0.1``; no name lookup):
tests never aim load anywhere else. Requests go straight to the target through
``http.client``, so no proxy from the environment is used.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

__all__ = ["LoadGenerator", "Record"]

#: The header the cul8er instance server names its version in.
VERSION_HEADER: Final = "X-Cul8er-Version"
#: The most of a body kept to read a version from (``/version`` answers are tiny).
MAX_VERSION_BODY: Final = 256


@dataclass(frozen=True, slots=True)
class Record:
    """One scheduled request and what became of it."""

    #: When it was sent (``time.monotonic()``); for a skipped one, when it was due.
    sent_at: float
    #: The same moment on the wall clock (``time.time()``), to line up with logs.
    wall_time: float
    #: How far behind its due time it was sent (seconds).
    lag: float
    #: Seconds from sending to the end of the answer; ``None`` when skipped.
    latency: float | None = None
    #: The HTTP status; ``None`` when no answer came (see ``error``) or it was skipped.
    status: int | None = None
    #: What went wrong, as ``"ExceptionName: text"``; ``None`` when an answer came.
    error: str | None = None
    #: The ``X-Cul8er-Version`` header, or for a ``/version`` URL the version in the body.
    version: str | None = None
    #: Not sent, because every worker was busy at its due time.
    skipped: bool = False

    @property
    def ok(self) -> bool:
        """Whether it was answered with a 2xx status."""
        return self.status is not None and 200 <= self.status < 300


def _check_loopback(host: str | None) -> str:
    """``host`` if it is a loopback IP literal, else ``ValueError``."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        raise ValueError(f"load goes to a loopback IP address only, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"load goes to a loopback IP address only, not {host!r}")
    return str(address)


def _version_in_body(body: bytes) -> str | None:
    """The version a ``/version`` answer names: JSON ``{"version": ...}`` or plain text."""
    text = body[:MAX_VERSION_BODY].decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text or None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, str) else text or None


class LoadGenerator:
    """GET ``url`` ``rate`` times a second from ``start()`` until ``stop()``.

    Parameters:
        url: ``http://127.0.0.1:PORT/path``; any other host raises ``ValueError``.
        rate: requests per second, scheduled open-loop.
        timeout: per request, connect and read (seconds).
        headers: sent with every request.
        workers: requests in flight at most; a request due while all are busy is skipped.
    """

    def __init__(
        self,
        url: str,
        *,
        rate: float = 25.0,
        timeout: float = 2.0,
        headers: Mapping[str, str] | None = None,
        workers: int = 8,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"only http:// URLs are supported, not {url!r}")
        self._host = _check_loopback(parts.hostname)
        self._port = parts.port or 80
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._version_from_body = (parts.path or "/").rstrip("/").endswith("/version")
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number, not {rate!r}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers!r}")
        self.url = url
        self.rate = rate
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.workers = workers
        self._records: list[Record] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(workers)
        self._stopping = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._scheduler: threading.Thread | None = None
        self._started_at: float | None = None
        self._stopped_at: float | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> LoadGenerator:
        """Start sending; a generator runs once."""
        if self._started_at is not None:
            raise RuntimeError("this load generator has already been started")
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="loadgen")
        self._started_at = time.monotonic()
        self._scheduler = threading.Thread(target=self._schedule, name="loadgen", daemon=True)
        self._scheduler.start()
        return self

    def stop(self) -> None:
        """Stop scheduling, then wait for the requests in flight (at most ``timeout``)."""
        if self._scheduler is None or self._pool is None or self._stopped_at is not None:
            return
        self._stopping.set()
        self._scheduler.join()
        self._pool.shutdown(wait=True)
        self._stopped_at = time.monotonic()

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- results ---------------------------------------------------------------------

    @property
    def results(self) -> list[Record]:
        """Every record so far, skipped ones included, in the order they were due."""
        with self._lock:
            return sorted(self._records, key=lambda record: record.sent_at)

    @property
    def sent(self) -> list[Record]:
        """The records of requests actually sent."""
        return [record for record in self.results if not record.skipped]

    @property
    def failures(self) -> list[Record]:
        """Sent requests that got no answer or a non-2xx one."""
        return [record for record in self.sent if not record.ok]

    @property
    def skipped(self) -> list[Record]:
        """Requests not sent because every worker was busy."""
        return [record for record in self.results if record.skipped]

    @property
    def count(self) -> int:
        """How many requests were sent (and have finished)."""
        return len(self.sent)

    def by_version(self) -> Counter[str | None]:
        """How many successful answers each version gave (``None``: not named)."""
        return Counter(record.version for record in self.sent if record.ok)

    def window(self, t0: float, t1: float) -> list[Record]:
        """The records sent in ``[t0, t1)``, both ``time.monotonic()`` values."""
        return [record for record in self.results if t0 <= record.sent_at < t1]

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (0–100, nearest rank) of answered requests' latency."""
        if not 0 <= p <= 100:
            raise ValueError(f"a percentile is between 0 and 100, not {p!r}")
        latencies = sorted(
            record.latency
            for record in self.sent
            if record.latency is not None and record.status is not None
        )
        if not latencies:
            raise ValueError("no answered requests to take a percentile of")
        rank = max(1, math.ceil(p / 100 * len(latencies)))
        return latencies[rank - 1]

    def rate_achieved(self) -> float:
        """Requests sent per second, from start to stop (or to now while running)."""
        if self._started_at is None:
            return 0.0
        end = self._stopped_at if self._stopped_at is not None else time.monotonic()
        elapsed = end - self._started_at
        return self.count / elapsed if elapsed > 0 else 0.0

    # -- internals -------------------------------------------------------------------

    def _schedule(self) -> None:
        """Dispatch request ``i`` at ``start + i / rate`` until stopped."""
        assert self._started_at is not None and self._pool is not None
        index = 0
        while True:
            due = self._started_at + index / self.rate
            if self._stopping.wait(max(0.0, due - time.monotonic())):
                return
            index += 1
            if not self._slots.acquire(blocking=False):
                self._add(
                    Record(
                        sent_at=due,
                        wall_time=time.time(),
                        lag=max(0.0, time.monotonic() - due),
                        error=f"skipped: all {self.workers} workers busy",
                        skipped=True,
                    )
                )
                continue
            self._pool.submit(self._send, due)

    def _send(self, due: float) -> None:
        """Send one request and record it; frees its worker slot whatever happens."""
        try:
            self._add(self._request(due))
        finally:
            self._slots.release()

    def _request(self, due: float) -> Record:
        wall_time = time.time()
        sent_at = time.monotonic()
        lag = max(0.0, sent_at - due)
        connection = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            connection.request("GET", self._target, headers=self.headers)
            response = connection.getresponse()
            body = response.read()
            version = response.getheader(VERSION_HEADER)
            if version is None and self._version_from_body and response.status == 200:
                version = _version_in_body(body)
            return Record(
                sent_at=sent_at,
                wall_time=wall_time,
                lag=lag,
                latency=time.monotonic() - sent_at,
                status=response.status,
                version=version,
            )
        except (OSError, http.client.HTTPException) as exc:
            return Record(
                sent_at=sent_at,
                wall_time=wall_time,
                lag=lag,
                latency=time.monotonic() - sent_at,
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            connection.close()

    def _add(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)
