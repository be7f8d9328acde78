"""The ``webhook`` observer: each event POSTed as JSON, signed, with an ``Idempotency-Key``.

A delivery is retried inside the call (lost connections, timeouts, 429, 5xx) with
exponential backoff, then becomes a ``TransientError`` so the task retries later; any
other 4xx is a ``PermanentError``. Deliveries may repeat (Celery redelivers, the task
retries): the receiver dedupes on ``Idempotency-Key``, which is the event id.

Errors and log lines name the URL's host only: a path or query may carry a token, and the
signing key never leaves :class:`WebhookConfig`'s ``SecretStr`` except into the HMAC.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
import threading
from typing import TYPE_CHECKING, Annotated, Any, Final
from urllib.parse import urlsplit

import structlog
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator

from schemas.plugins import Ack, HealthStatus
from workers.plugin_api import PermanentError, TransientError, remember

if TYPE_CHECKING:
    import requests
    from requests.structures import CaseInsensitiveDict
    from tenacity import RetryCallState

    from schemas.events import Event
    from schemas.plugins import MetricSample
    from workers.plugin_api import PluginContext

__all__ = [
    "RETRY_FIRST_WAIT",
    "RETRY_MAX_WAIT",
    "SIGNATURE_HEADER",
    "WebhookConfig",
    "WebhookObserver",
    "metric_idempotency_key",
    "sign",
]

log = structlog.get_logger(__name__)

#: The first retry waits about this long (seconds), doubling up to RETRY_MAX_WAIT.
RETRY_FIRST_WAIT: Final = 0.2
RETRY_MAX_WAIT: Final = 2.0
#: ``sha256=<hex HMAC-SHA256 of the body>`` when a signing key is configured.
SIGNATURE_HEADER: Final = "X-Cul8er-Signature"

#: RFC 9110 token characters: what a header name may be made of.
_HEADER_NAME: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@functools.cache
def _not_retried() -> tuple[type[Exception], ...]:
    """requests errors about our own request (bad URL or header): retrying cannot help.

    requests is imported at the first delivery, not when the plugin loads.
    """
    import requests.exceptions

    return (
        requests.exceptions.InvalidURL,
        requests.exceptions.InvalidHeader,
        requests.exceptions.InvalidSchema,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidJSONError,
    )


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("the webhook URL must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("the webhook URL has no host")
    _ = parts.port  # raises ValueError for a port that is not a number in range
    return value


class WebhookConfig(BaseModel):
    """Config of the ``webhook`` observer."""

    model_config = ConfigDict(extra="forbid")

    #: Where events are POSTed (http or https).
    url: Annotated[str, AfterValidator(_http_url)]
    #: HMAC-SHA256 signing key; the receiver checks ``X-Cul8er-Signature`` with it.
    secret: SecretStr | None = None
    #: Seconds one HTTP attempt may take to connect, and then to answer.
    timeout: float = Field(default=5.0, gt=0)
    #: HTTP attempts of one delivery before the task sees a TransientError.
    attempts: int = Field(default=4, ge=1, le=10)
    #: Extra headers on every request (ours win on a clash).
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: dict[str, str]) -> dict[str, str]:
        # Refused here rather than by requests at the first event, and never quoting values.
        for name, text in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"invalid header name {name!r}")
            if "\r" in text or "\n" in text:
                raise ValueError(f"the value of header {name!r} contains a line break")
        return value


def sign(key: str, body: bytes) -> str:
    """The ``X-Cul8er-Signature`` value of ``body``: ``sha256=`` and the hex HMAC."""
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def metric_idempotency_key(metric: MetricSample) -> str:
    """The same key for every delivery of one sample: sha256 of its name, labels and time."""
    identity = [metric.name, sorted(metric.labels.items()), metric.at.isoformat()]
    return hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode()).hexdigest()


class _UndeliveredError(Exception):
    """Internal: an attempt failed in a way that may pass; tenacity retries it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    log.warning(
        "webhook_retry",
        attempt=state.attempt_number,
        reason=error.reason if isinstance(error, _UndeliveredError) else type(error).__name__,
        wait=round(state.upcoming_sleep, 2),
    )


class WebhookObserver:
    """POSTs every event (and metric) to one URL, with retries and an idempotency key."""

    def __init__(self, config: WebhookConfig, context: PluginContext | None = None) -> None:
        self.config = config
        self.context = context
        parts = urlsplit(config.url)
        # Host and port only: the path, query or user info may hold a token.
        self.host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
        if config.secret is not None:
            # Masked by the log redaction in this process should anything ever quote it.
            remember(config.secret.get_secret_value())
        self._lock = threading.Lock()
        self._session: requests.Session | None = None
        self._session_pid = 0
        self._last_failure: str | None = None
        self._delivered = 0

    # -- contract ---------------------------------------------------------------------------

    def observe_event(self, event: Event) -> Ack:
        """POST the event; its ``event_id`` is the ``Idempotency-Key`` of every attempt."""
        body = _json(event.model_dump(mode="json"))
        attempts = self._deliver(
            body, idempotency_key=str(event.event_id), event_type=event.event_type
        )
        return Ack(ok=True, detail=f"delivered to {self.host} after {attempts} attempt(s)")

    def report_metric(self, metric: MetricSample) -> Ack:
        """POST ``{"metric": ...}``, keyed by the sample's name, labels and time."""
        body = _json({"metric": metric.model_dump(mode="json")})
        attempts = self._deliver(
            body, idempotency_key=metric_idempotency_key(metric), event_type="metric"
        )
        return Ack(ok=True, detail=f"delivered to {self.host} after {attempts} attempt(s)")

    def health_status(self) -> HealthStatus:
        """Healthy unless the last delivery failed; the detail says why."""
        failure = self._last_failure
        if failure is not None:
            return HealthStatus(healthy=False, detail=failure)
        if self._delivered:
            return HealthStatus(healthy=True, detail=f"last delivery to {self.host} succeeded")
        return HealthStatus(healthy=True, detail=f"nothing delivered to {self.host} yet")

    def flush(self) -> Ack:
        """Nothing to do: every delivery is sent before its call returns."""
        return Ack(ok=True, detail="nothing buffered")

    # -- delivery ---------------------------------------------------------------------------

    def _deliver(self, body: bytes, *, idempotency_key: str, event_type: str) -> int:
        """POST ``body`` until accepted; the number of attempts it took.

        Raises:
            TransientError: every attempt failed in a way that may pass.
            PermanentError: the receiver refused the request (4xx other than 429, 3xx).
        """
        headers = self._headers(body, idempotency_key=idempotency_key, event_type=event_type)
        try:
            status, attempts = self._post(body, headers)
            self._check_accepted(status)
        except (TransientError, PermanentError) as exc:
            self._failed(str(exc), event_type, idempotency_key)
            raise
        self._last_failure = None
        self._delivered += 1
        log.info(
            "webhook_delivered",
            host=self.host,
            event_type=event_type,
            idempotency_key=idempotency_key,
            status=status,
            attempts=attempts,
        )
        return attempts

    def _headers(
        self, body: bytes, *, idempotency_key: str, event_type: str
    ) -> CaseInsensitiveDict[str]:
        """The configured headers, then ours: content type, idempotency key, event, signature."""
        from requests.structures import CaseInsensitiveDict

        headers: CaseInsensitiveDict[str] = CaseInsensitiveDict(self.config.headers)
        headers["Content-Type"] = "application/json"
        headers["Idempotency-Key"] = idempotency_key
        headers["X-Cul8er-Event"] = event_type
        if self.config.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.config.secret.get_secret_value(), body)
        return headers

    def _post(self, body: bytes, headers: CaseInsensitiveDict[str]) -> tuple[int, int]:
        """POST until the receiver answers other than 429 or 5xx: its status, and the attempts.

        Raises:
            TransientError: the last attempt still failed in a way that may pass.
            PermanentError: the request cannot be sent as it is (bad URL or header).
        """
        import requests.exceptions
        from tenacity import (
            Retrying,
            retry_if_exception_type,
            stop_after_attempt,
            wait_exponential_jitter,
        )

        made = 0
        not_retried = _not_retried()

        def attempt() -> int:
            nonlocal made
            made += 1
            try:
                response = self._http().post(
                    self.config.url,
                    data=body,
                    headers=headers,
                    timeout=self.config.timeout,
                    # A redirected POST comes back as a GET: the event would be lost.
                    allow_redirects=False,
                )
            except not_retried as exc:
                raise PermanentError(
                    f"webhook {self.host}: request refused before sending ({type(exc).__name__})"
                ) from exc
            except requests.exceptions.RequestException as exc:
                # The class name only: requests' message quotes the URL's path and query.
                raise _UndeliveredError(type(exc).__name__) from exc
            if response.status_code == 429 or response.status_code >= 500:
                raise _UndeliveredError(f"status {response.status_code}")
            return response.status_code

        retrying = Retrying(
            stop=stop_after_attempt(self.config.attempts),
            wait=wait_exponential_jitter(
                multiplier=RETRY_FIRST_WAIT, max=RETRY_MAX_WAIT, jitter=RETRY_FIRST_WAIT
            ),
            retry=retry_if_exception_type(_UndeliveredError),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            return retrying(attempt), made
        except _UndeliveredError as exc:
            raise TransientError(
                f"webhook {self.host} unavailable after {made} attempt(s): last {exc.reason}"
            ) from exc

    def _check_accepted(self, status: int) -> None:
        """Refuse a final answer other than 2xx: the receiver will not take this delivery."""
        if 200 <= status < 300:
            return
        if 300 <= status < 400:
            raise PermanentError(
                f"webhook {self.host} redirected (status {status}): set the final URL"
            )
        raise PermanentError(f"webhook {self.host} refused the delivery with status {status}")

    def _failed(self, message: str, event_type: str, idempotency_key: str) -> None:
        self._last_failure = message
        log.warning(
            "webhook_delivery_failed",
            host=self.host,
            event_type=event_type,
            idempotency_key=idempotency_key,
            error=message,
        )

    def _http(self) -> requests.Session:
        """This process's session (keep-alive connections), made anew after a fork."""
        import requests

        pid = os.getpid()
        with self._lock:
            if self._session is None or self._session_pid != pid:
                # A pool inherited through fork shares its sockets with the parent.
                self._session = requests.Session()
                self._session_pid = pid
            return self._session


def _json(payload: dict[str, Any]) -> bytes:
    # Compact and sorted: the bytes signed are the bytes sent, the same on every attempt.
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
