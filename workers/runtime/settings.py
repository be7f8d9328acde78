"""Settings, read once from ``CUL8ER_*`` environment variables and an optional ``.env`` file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Every knob of cul8er; the defaults are the embedded single-machine stack."""

    model_config = SettingsConfigDict(env_prefix="CUL8ER_", env_file=".env", extra="ignore")

    #: Where the embedded parts live: SQLite file, embedded Redis, local instances.
    data_dir: Path = Path("var")
    #: ``None`` starts (or reuses) the embedded Redis under ``data_dir``.
    broker_url: str | None = None
    #: ``None`` uses the broker for Redis brokers and ``rpc://`` for AMQP brokers.
    result_backend: str | None = None
    #: ``None`` is ``sqlite:///{data_dir}/cul8er.db``.
    database_url: str | None = None
    #: A YAML plan catalog replacing the built-in one.
    plans_file: Path | None = None
    #: Extra task modules every worker imports (third-party workflows, benchmarks).
    imports: list[str] = Field(default_factory=list)

    #: The provisioner plugin that lays out a tenant's compute, unless its create names one.
    default_provisioner: str = "container_per_tenant"
    #: The provisioner plugin that gives each tenant its own database.
    data_provisioner: str = "database_per_tenant"
    #: Platform of new tenants: local, docker or incus.
    default_platform: str = "local"
    #: The port a tenant's service listens on inside a container.
    instance_port: int = 8080
    #: Docker: the engine (``None`` reads DOCKER_HOST, else the local socket) and the image.
    docker_host: str | None = None
    docker_image: str = "cul8er/instance:latest"
    #: Incus (or LXD): the daemon's unix socket and the image alias instances start from.
    incus_socket: str = "/var/lib/incus/unix.socket"
    incus_image: str = "cul8er-instance"
    #: Attempts of one engine API call before the step sees a TransientError.
    engine_attempts: int = 3
    #: Seconds one engine API call may take.
    engine_timeout: float = 30.0
    #: Each tenant gets one /24 of this pool.
    network_pool: str = "10.100.0.0/16"

    #: Metering window and beat interval (seconds): one usage row per tenant, metric, window.
    meter_interval: float = 60.0
    #: Tenants per ``meter_tenant`` chunk message in a metering fan-out.
    meter_chunk_size: int = 100
    #: How often beat evaluates autoscale rules (seconds).
    autoscale_interval: float = 60.0
    #: How often beat sweeps tenants' health (seconds).
    health_sweep_interval: float = 30.0
    #: Billing period length, counted from each tenant's billing anchor.
    billing_period: Literal["month", "day", "hour", "minute"] = "month"
    #: When beat closes the periods that ended (UTC, daily crontab); with a period shorter
    #: than a day, every ``billing_close_interval`` seconds instead.
    billing_close_hour: int = 0
    billing_close_minute: int = 15
    billing_close_interval: float = 60.0
    #: When beat removes old task results, idempotency keys and usage readings (UTC, daily).
    cleanup_hour: int = 3
    #: Idempotency keys and schedule-slot keys older than this are removed (days).
    operations_retention_days: int = 30
    #: How long a tenant whose payment failed keeps running before it is suspended (s).
    payment_grace: float = 3 * 24 * 3600.0
    #: Default autoscale cooldown and scale-down stabilization window (seconds).
    autoscale_cooldown: float = 15 * 60.0
    autoscale_stabilization: float = 5 * 60.0

    #: How often beat dispatches due waits and retries (seconds).
    tick_interval: float = 2.0
    #: How often beat looks for workflows that stopped making progress and steps whose
    #: owner died (seconds); with the owner timeout this bounds recovery from a dead worker.
    reconcile_interval: float = 5.0
    #: How often beat compares the platforms with the database (seconds).
    drift_interval: float = 60.0
    #: Whether that comparison destroys orphaned instances (otherwise it reports them).
    drift_prune: bool = False
    #: A run with no owner and no progress for this long is re-dispatched (its message was
    #: lost, or waits behind a backlog: a duplicate then only costs the ledger a read).
    reconcile_grace: float = 120.0
    #: The same, sooner, while the step queue is empty: no backlog can be holding the
    #: message, and a dead worker's unacknowledged ones are back after the visibility
    #: timeout, so a step still untouched this long after its hand-over was lost (s).
    lost_message_grace: float = 30.0
    #: Retries shorter than this wait in the broker; longer ones wait in the ledger.
    max_broker_countdown: float = 5.0
    #: Attempts of one step before a TransientError becomes a failure.
    step_max_attempts: int = 6
    retry_backoff_base: float = 1.0
    retry_backoff_max: float = 300.0
    #: Hard and soft Celery time limits of one step (seconds).
    step_time_limit: float = 300.0
    #: How often each worker process proves it is alive and renews the steps it runs (s).
    heartbeat_interval: float = 2.0
    #: A step whose owner has not renewed it for this long is taken over (seconds):
    #: recovery from a dead worker takes about this, whatever ``step_time_limit`` is.
    owner_timeout: float = 10.0
    #: Whether a claimer on the owner's own host checks that the owner's process still
    #: exists: a killed pool child's step is then taken over at once, not after the timeout.
    owner_exit_check: bool = True
    #: Redis brokers: a message delivered but not acknowledged for this long goes back to
    #: its queue (kombu's ``visibility_timeout``, 3600 s by default). It bounds how long the
    #: messages of a wholly killed worker wait. Shorter than a step only costs a duplicate
    #: delivery, which the ledger turns away; long waits never sit in the broker.
    broker_visibility_timeout: float = 15.0

    #: How long one health probe waits for an answer (seconds).
    health_timeout: float = 2.0
    #: How long the health step keeps probing inside one attempt (seconds).
    health_window: float = 5.0
    #: How long a local instance may take to start listening (seconds).
    instance_start_timeout: float = 20.0

    #: The load-balancer plugin that gives each tenant a stable entry point (``""``: none;
    #: tenants are then reached at their instances' own addresses).
    load_balancer: str = "haproxy"
    #: HAProxy's folder: config, runtime API sockets, state file (``None``: under ``data_dir``).
    haproxy_dir: Path | None = None
    #: The HAProxy binary.
    haproxy_binary: str = "haproxy"
    #: The 127.0.0.1 ports tenants' entry points are given from, inclusive.
    entry_port_min: int = 21000
    entry_port_max: int = 21999
    #: The strategy of a deployment that names none.
    default_strategy: str = "canary"
    #: Distinct approvals a production deployment needs before it starts.
    production_approvals: int = 1
    #: How long an approval (and a deployment waiting for approvals) stays valid (seconds).
    approval_ttl: float = 24 * 3600.0

    #: Folders holding plugin folders and .zip/.tar.gz plugin packages, ``os.pathsep``-separated.
    plugin_path: str = ""
    #: Refuse plugins without a valid ed25519 signature by one of ``plugin_trusted_keys``.
    require_signed_plugins: bool = False
    #: Base64 ed25519 public keys whose signatures are trusted.
    plugin_trusted_keys: list[str] = Field(default_factory=list)
    #: Package indexes (PEP 503/691 "simple" URLs such as ``http://127.0.0.1:8080/simple/``)
    #: that ``cul8er plugin install NAME``, ``search`` and ``update`` use, tried in order; a
    #: JSON list or comma-separated. A password goes in as a reference,
    #: ``https://user:${secret:registry/password}@host/simple/``, resolved per request and
    #: never logged or stored. Empty: ``plugin install NAME`` runs pip, as before.
    plugin_registries: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("plugin_registries", mode="before")
    @classmethod
    def _registries(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    #: Plugin name → its config (JSON); values may be ``${secret:path}`` references.
    plugin_config: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: Plugin name → the queue its tasks go to, overriding ``plugins.<name>``.
    plugin_queues: dict[str, str] = Field(default_factory=dict)
    #: How long a process trusts its view of the ``plugins`` table (seconds): enable,
    #: disable and reload reach running workers within this time.
    plugin_state_ttl: float = 1.0
    #: How long a workflow step waits for a plugin task run on another worker (seconds).
    plugin_call_timeout: float = 120.0
    #: Plugin call outcomes are counted per time window of this many seconds ...
    plugin_stats_window: float = Field(default=5.0, gt=0)
    #: ... and written to ``plugin_call_stats`` this often by each worker process (seconds).
    plugin_stats_flush: float = Field(default=1.0, gt=0)
    #: The secrets plugin that resolves ``${secret:path}`` (``${secret:name:path}`` names one).
    secrets_provider: str = "env"
    #: The ``file`` secrets plugin's store, and the Fernet key (base64) it is encrypted with.
    secrets_file: Path | None = None
    secrets_key: SecretStr | None = None

    #: The queue untrusted plugins' tasks go to; its worker applies the limits below.
    sandbox_queue: str = "plugins.sandbox"
    #: Hard time limit of one sandboxed operation (seconds); the soft limit is 1 s less.
    sandbox_time_limit: float = 30.0
    #: Address-space limit of a sandbox worker process (RLIMIT_AS, MiB).
    sandbox_memory_mb: int = 1024
    #: CPU seconds one sandboxed operation may use (RLIMIT_CPU) before it is killed.
    sandbox_cpu_seconds: int = 20
    #: Open files of a sandbox worker process (RLIMIT_NOFILE).
    sandbox_open_files: int = 256
    #: Resident memory after which a sandbox worker process is replaced (KiB, Celery's
    #: ``--max-memory-per-child``).
    sandbox_max_memory_per_child: int = 512 * 1024

    #: Observers called in the emitting process (cheap, local); others get a message each event.
    inline_observers: list[str] = Field(default_factory=lambda: ["log", "prometheus"])
    #: Where multi-process Prometheus metrics are written (``None``: under ``data_dir``).
    prometheus_dir: Path | None = None
    #: Port a worker serves ``/metrics`` on, on 127.0.0.1 (``0``: no exporter).
    prometheus_port: int = 0

    # -- the HTTP API (``cul8er api``) -----------------------------------------------------------
    #: Where ``cul8er api`` listens (loopback by default; put TLS or a proxy in front).
    api_host: str = "127.0.0.1"
    api_port: int = 8800
    #: HS256 shared secret for bearer tokens (``cul8er api token`` signs with it).
    api_jwt_secret: SecretStr | None = None
    #: RS256/ES256: a PEM public key file, or a JWKS URL (keys cached); a PEM private key file
    #: lets ``cul8er api token`` sign with it.
    api_jwt_public_key_file: Path | None = None
    api_jwks_url: str | None = None
    api_jwt_private_key_file: Path | None = None
    #: Algorithms accepted (``none`` never is).
    api_jwt_algorithms: list[str] = Field(default_factory=lambda: ["HS256", "RS256", "ES256"])
    #: Required ``iss`` and ``aud`` claims.
    api_jwt_issuer: str = "cul8er"
    api_jwt_audience: str = "cul8er-api"
    #: Clock skew allowed on ``exp`` and ``nbf`` (seconds).
    api_jwt_leeway: float = 30.0
    #: Calls per subject per window, per route class (the ``limits`` notation).
    api_rate_read: str = "600/minute"
    api_rate_write: str = "120/minute"
    #: Proxies whose ``X-Forwarded-*`` headers are honoured (comma-separated addresses).
    api_forwarded_allow_ips: str = "127.0.0.1"

    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Workers, beat and the CLI may start in different folders; pin the path once.
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _liveness(self) -> Settings:
        # One missed beat must never look like a dead owner.
        if self.owner_timeout < 2 * self.heartbeat_interval:
            raise ValueError(
                f"owner_timeout ({self.owner_timeout} s) must be at least twice "
                f"heartbeat_interval ({self.heartbeat_interval} s)"
            )
        if self.lost_message_grace <= self.broker_visibility_timeout:
            raise ValueError(
                f"lost_message_grace ({self.lost_message_grace} s) must be longer than "
                f"broker_visibility_timeout ({self.broker_visibility_timeout} s): a killed "
                "worker's messages are not lost before they come back"
            )
        if self.max_broker_countdown >= self.broker_visibility_timeout:
            raise ValueError(
                f"max_broker_countdown ({self.max_broker_countdown} s) must be shorter than "
                f"broker_visibility_timeout ({self.broker_visibility_timeout} s): a countdown "
                "held past it is delivered twice"
            )
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL, the SQLite file under ``data_dir`` unless one is set."""
        return self.database_url or f"sqlite:///{self.data_dir / 'cul8er.db'}"

    @property
    def step_lease(self) -> float:
        """How long a claimed step is its delivery's: until Celery's hard limit kills it."""
        return self.step_time_limit + 10

    @property
    def plugin_folders(self) -> list[Path]:
        """``plugin_path`` as folders, plus the folder ``cul8er plugin install`` copies into."""
        folders = [Path(p).expanduser().resolve() for p in self.plugin_path.split(os.pathsep) if p]
        return [*folders, self.installed_plugins_dir]

    @property
    def installed_plugins_dir(self) -> Path:
        """Where ``cul8er plugin install`` keeps plugins, one folder per name and version."""
        return self.data_dir / "plugins"

    @property
    def haproxy_folder(self) -> Path:
        """HAProxy's folder: ``haproxy_dir``, else ``data_dir/haproxy``.

        A unix socket path is limited to about 100 bytes: when ``data_dir`` is too deep
        for ``haproxy/admin.sock`` under it, the folder is a short one in the temporary
        directory named after ``data_dir``, the same for every process of this data dir.
        """
        if self.haproxy_dir is not None:
            return self.haproxy_dir.expanduser().resolve()
        folder = self.data_dir / "haproxy"
        if len(str(folder / "admin.sock").encode()) <= 100:
            return folder
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"cul8er-haproxy-{digest}"

    @property
    def embedded_broker(self) -> bool:
        """Whether the broker is the embedded Redis that cul8er runs itself."""
        return self.broker_url is None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, loaded on first use."""
    return Settings()
