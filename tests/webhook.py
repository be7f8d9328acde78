"""A webhook endpoint on loopback that remembers what it was sent (a real HTTP server)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1 keeping ``(Idempotency-Key, event)`` per POST."""

    url: str = ""
    received: list[tuple[str | None, dict[str, Any]]] = field(default_factory=list)

    def of_type(self, event_type: str) -> list[tuple[str | None, dict[str, Any]]]:
        return [(k, e) for k, e in list(self.received) if e.get("event_type") == event_type]


@contextlib.contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    """A running :class:`Receiver`; it answers 200 to every POST."""
    found = Receiver()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                found.received.append((self.headers.get("Idempotency-Key"), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    found.url = f"http://127.0.0.1:{server.server_port}/hook"
    try:
        yield found
    finally:
        server.shutdown()
        server.server_close()
