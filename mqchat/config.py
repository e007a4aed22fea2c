"""Settings: one pydantic-settings class with nested sections.

Sources, highest priority first: explicit values (CLI flags), ``MQCHAT_*``
environment variables (nested with ``__``, e.g. ``MQCHAT_MQTT__PORT=1884``), a
TOML config file, then the defaults below. docs/configuration.md lists every key.
No module-level instance exists: the CLI builds one and hands it to
``build_services``.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from mqchat.bridge.redis_client import parse_redis_url


class _Section(BaseModel):
    # A misspelt key in a config file is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class MqttSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(default=1883, ge=0, le=65535)
    ws_port: int = Field(default=8083, ge=0, le=65535)
    """MQTT over WebSocket; any path works, browsers conventionally use /mqtt."""
    public_ws_port: int | None = Field(default=None, ge=1, le=65535)
    """The WebSocket port browsers are told to use (``GET /v1/client-config``) when it is not
    the one this node listens on: behind a load balancer, the balancer's port."""
    public_wss_port: int | None = Field(default=None, ge=1, le=65535)
    """The same for MQTT over secure WebSocket."""
    max_payload_bytes: int = Field(default=64 * 1024, ge=1024)


class HttpSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    long_poll_max_seconds: int = Field(default=60, ge=1, le=300)
    header_timeout_seconds: float = Field(default=10, gt=0, le=300)
    """A connection must send a complete request head within this time of opening, or of its
    previous response; otherwise it is closed (slowloris). Trickling bytes does not extend it."""
    body_timeout_seconds: float = Field(default=30, gt=0, le=300)
    """A request body must arrive whole within this time of its head: 408 ``request_timeout``."""
    keepalive_timeout_seconds: int = Field(default=5, ge=1, le=300)
    """An idle keep-alive connection (no byte since its last response) is closed after this."""
    max_connections: int = Field(default=10_000, ge=1)
    """Open connections per HTTP listener (at most a quarter of the open-file limit); beyond
    it a new connection gets 503 and is closed at once."""
    trusted_proxies: list[str] = Field(default_factory=list)
    """Addresses or networks (CIDR) of reverse proxies whose ``X-Forwarded-For`` and
    ``X-Forwarded-Proto`` are believed. Empty: the headers are ignored, the peer is the client."""

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        # Normalised (``10.1.2.3/8`` -> ``10.0.0.0/8``): uvicorn silently treats a network it
        # cannot parse strictly as a literal that matches nothing.
        normalised = []
        for entry in value:
            try:
                if "/" in entry:
                    normalised.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
                else:
                    normalised.append(str(ipaddress.ip_address(entry.strip())))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return normalised


class AuthSettings(_Section):
    token_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    secret: str | None = None
    """HMAC key for access tokens. Unset: generated once into ``{data_dir}/secret.key``."""
    login_max_failures: int = Field(default=5, ge=1)
    """Failed logins for one user id within ``login_window_seconds`` before POST /v1/token answers 429."""
    login_max_failures_per_ip: int = Field(default=30, ge=1)
    """Failed logins from one client address (any user ids) within the window before 429."""
    login_window_seconds: float = Field(default=300, gt=0)
    registration: Literal["open", "closed", "token"] = "open"
    """Who may create an account over ``POST /v1/users``: anyone; nobody (``mqchat user add``
    still works); or whoever sends ``registration_token``. Refusals: 403 ``registration_closed``."""
    registration_token: str | None = None
    """The shared secret ``registration = "token"`` asks for."""
    registrations_per_ip_per_hour: int = Field(default=10, ge=1)
    """Registrations one client address may attempt in an hour; beyond it 429 ``rate_limited``."""
    password_hash_concurrency: int = Field(default=2, ge=1)
    """Password hashes (argon2, tens of ms of CPU each) computed at once for logins, registrations
    and password changes."""
    password_hash_queue: int = Field(default=16, ge=0)
    """Requests that may wait for a hashing slot; beyond it 503 ``server_busy`` at once."""

    @model_validator(mode="after")
    def _token_for_token_registration(self) -> AuthSettings:
        if self.registration == "token" and not self.registration_token:
            raise ValueError('auth.registration = "token" needs auth.registration_token')
        return self


class LimitsSettings(_Section):
    """What one client may cost the server. Every limit answers with a clear refusal."""

    max_packet_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest MQTT packet (its remaining length), checked before amqtt reads the body:
    a larger packet closes the connection (MQTT 3.1.1 has no error packet)."""
    connect_timeout_seconds: float = Field(default=10, gt=0)
    """A new MQTT connection must send its CONNECT within this time."""
    send_rate_per_second: float = Field(default=50, gt=0)
    """Sends per device (token bucket refill rate); over it a send gets ``rate_limited``."""
    send_burst: int = Field(default=500, ge=1)
    """Token bucket size: sends a device may make at once after being quiet."""
    user_send_rate_per_second: float = Field(default=100, gt=0)
    """Sends per user, all devices and HTTP together: device ids are free, so the per-device
    bucket alone would multiply with them."""
    user_send_burst: int = Field(default=1000, ge=1)
    command_rate_per_second: float = Field(default=200, gt=0)
    """Commands of any type per user (sends, syncs, acks, reads, recalls, typing, refused publishes)."""
    command_burst: int = Field(default=1000, ge=1)
    sync_rate_per_second: float = Field(default=20, gt=0)
    """Stream reads per user (``sync_messages``, ``GET /v1/sync``, long-poll reads): they cost
    far more than other commands."""
    sync_burst: int = Field(default=60, ge=1)
    max_concurrent_reads_per_user: int = Field(default=4, ge=1)
    """Stream reads of one user running at once; beyond it ``rate_limited``, so that one user's
    reads never queue ahead of everyone's connects."""
    max_new_devices_per_hour: int = Field(default=50, ge=1)
    """Device ids a user may connect with for the first time in an hour (MQTT); beyond it CONNACK 0x05."""
    max_connections_per_user: int = Field(default=20, ge=1)
    """Live MQTT connections of one user (all devices); beyond it CONNACK 0x05."""
    max_subscriptions_per_connection: int = Field(default=500, ge=2)
    """Topic filters one connection may hold; beyond it the SUBACK return code is 0x80."""
    http_max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest HTTP request body; larger ones get 413 ``payload_too_large``."""
    max_outgoing_buffer_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """Bytes the broker may hold for one connection that does not read them; beyond it the
    connection is closed (the device catches up from its cursor when it reconnects)."""
    max_unacked_deliveries: int = Field(default=10_000, ge=10, le=60_000)
    """QoS 1 deliveries to one connection waiting for their PUBACK; beyond it, as above."""
    max_inflight_qos2: int = Field(default=100, ge=1, le=65_535)
    """QoS 2 PUBLISHes of one connection waiting for their PUBREL; beyond it the connection is closed."""
    session_expiry_seconds: float = Field(default=3600, ge=0)
    """How long a ``clean session = 0`` session outlives its connection (it keeps only its subscriptions)."""
    max_offline_sessions_per_user: int = Field(default=10, ge=0)
    """Offline persistent sessions kept per user; beyond it the oldest is forgotten."""
    max_connections_per_listener: int = Field(default=100_000, ge=1)
    """Open connections on one MQTT listener (TCP or WebSocket), authenticated or not; beyond it
    a new connection is closed at once."""


class TlsSettings(_Section):
    """TLS listeners, started when ``certfile`` and ``keyfile`` are set."""

    certfile: Path | None = None
    """PEM server certificate (with its chain)."""
    keyfile: Path | None = None
    """PEM private key of the certificate."""
    mqtts_port: int = Field(default=8883, ge=0, le=65535)
    wss_port: int = Field(default=8884, ge=0, le=65535)
    https_port: int = Field(default=8443, ge=0, le=65535)
    plain_listeners: bool = True
    """False: only the TLS listeners run (no plain MQTT, WebSocket or HTTP port)."""

    @property
    def enabled(self) -> bool:
        return self.certfile is not None and self.keyfile is not None

    @model_validator(mode="after")
    def _both_or_neither(self) -> TlsSettings:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("tls.certfile and tls.keyfile go together")
        if not self.plain_listeners and not self.enabled:
            raise ValueError("tls.plain_listeners = false needs tls.certfile and tls.keyfile")
        return self


class DatabaseSettings(_Section):
    auto_migrate: bool = True
    """Apply pending schema migrations when a command starts (under a database lock). False:
    refuse to start on an older schema until ``mqchat db upgrade`` has run, e.g. to migrate
    a cluster's database once, on purpose, before starting new nodes."""
    statement_timeout_seconds: float = Field(default=5, gt=0, le=3600)
    """PostgreSQL: the longest a statement may run (server side, ``statement_timeout``) and
    wait for an answer (client side, one second more): a silent database fails sends with
    ``storage_unavailable`` within this instead of holding them for the whole outage.
    Migrations are exempt."""
    idle_in_transaction_timeout_seconds: float = Field(default=5, ge=0, le=3600)
    """PostgreSQL: the server ends a session whose open transaction has waited this long for
    its next statement (``idle_in_transaction_session_timeout``), releasing its row locks. A
    node frozen mid-transaction (SIGSTOP, a paused VM) otherwise holds the locks on the stream
    heads it touched, and every other node's sends to those streams fail until it wakes (seen
    in tests/cluster/test_failover.py: none stored within 60 s). mqchat's own transactions never
    wait between statements, so only a stalled process hits it. 0: never."""
    health_timeout_seconds: float = Field(default=2, gt=0, le=60)
    """``/healthz`` answers 503 when the health write (one tiny transaction) takes longer."""


class MetricsSettings(_Section):
    """``GET /metrics`` (Prometheus text format); off unless ``token`` or ``port`` is set."""

    token: str | None = Field(default=None, min_length=16)
    """Serve ``/metrics`` on the HTTP API listeners to requests bearing this token
    (``Authorization: Bearer ...``). Unset: the API listeners have no ``/metrics``."""
    port: int | None = Field(default=None, ge=0, le=65535)
    """Serve ``/metrics`` (without a token) on a listener of its own at ``host:port``."""
    host: str = "127.0.0.1"
    """Interface of the ``port`` listener: loopback unless a scraper elsewhere must reach it."""

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.port is not None


class RetentionSettings(_Section):
    """How long history is kept; docs/operations.md, "Retention"."""

    days: float | None = Field(default=None, gt=0)
    """Stream entries (and then messages) older than this are deleted. None: history is kept forever."""
    offline_days: float = Field(default=7, gt=0)
    """An entry that some device of its user has not acked yet (past that device's cursor) is
    kept at least this long, even when ``days`` is shorter; pending push events are dropped after it."""
    interval_seconds: float = Field(default=3600, gt=0)
    """How often the pruner looks for old entries (the first pass runs at start-up)."""
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    """Rows deleted per transaction: small, so that sends never wait long behind the pruner."""


class PushSettings(_Section):
    """Push hooks for offline users: a webhook per event; docs/operations.md, "Push hooks"."""

    webhook_url: str | None = None
    """Where each event is POSTed (http:// or https://). Unset: no push events are written."""
    webhook_secret: str | None = Field(default=None, min_length=16)
    """Key of the HMAC-SHA256 in ``X-Mqchat-Signature``; required with ``webhook_url``."""
    max_attempts: int = Field(default=8, ge=1, le=100)
    """Deliveries tried per event; after the last failure it is dead-lettered."""
    timeout_seconds: float = Field(default=10, gt=0, le=300)
    """A delivery that has not answered within this time has failed."""
    backoff_seconds: float = Field(default=2, gt=0)
    """Wait after the first failure; each further failure doubles it."""
    backoff_max_seconds: float = Field(default=900, gt=0)
    """The longest wait between two attempts."""
    concurrency: int = Field(default=8, ge=1, le=1000)
    """Deliveries in flight at once (per node)."""
    preview_chars: int = Field(default=0, ge=0, le=1000)
    """Characters of the message text sent as ``preview``; 0 (the default) sends none."""

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _secret_with_url(self) -> PushSettings:
        if self.webhook_url is not None and not self.webhook_secret:
            raise ValueError("push.webhook_url needs push.webhook_secret (16 characters or more)")
        return self


class BridgeSettings(_Section):
    queue_size: int = Field(default=10_000, ge=1)
    """Commands waiting to be stored; beyond it a send gets ``server_busy`` (retry)."""
    batch_size: int = Field(default=500, ge=1)
    """Most commands stored in one transaction (group commit)."""
    catch_up_page: int = Field(default=100, ge=1, le=500)
    group_max_members: int = Field(default=1000, ge=2)
    recall_window_seconds: float = Field(default=120, ge=0)
    typing_interval_seconds: float = Field(default=1.0, ge=0)
    """A device's typing signals to one target are relayed at most this often (a state change always passes)."""


class ClusterSettings(_Section):
    """Cluster mode's timings (docs/scaling.md). Cluster mode itself is on when ``redis_url`` is set."""

    heartbeat_seconds: float = Field(default=2, gt=0)
    """How often a node renews its liveness key in Redis and looks for dead nodes."""
    node_ttl_seconds: float = Field(default=10, gt=0)
    """A node whose liveness key is older than this is dead: a survivor clears its devices'
    presence. Recovery of presence after a node dies takes up to this plus a heartbeat."""
    probe_seconds: float = Field(default=5, gt=0)
    """How often a node sends itself a message through its own Redis subscription; one that does
    not come back within ``probe_timeout_seconds`` means the subscription is dead: reconnect."""
    probe_timeout_seconds: float = Field(default=2, gt=0)
    group_cache_seconds: float = Field(default=30, gt=0)
    """Backstop for the group-membership cache: an entry older than this is read again, even if
    the change's invalidation was lost."""


DEFAULT_FILE_TYPES = [
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
    "video/mp4",
    "video/webm",
    "audio/mpeg",
    "audio/ogg",
    "application/zip",
]


class FilesSettings(_Section):
    """Attachments: ``POST /v1/files`` and the files messages carry (docs/protocol.md, "Files")."""

    directory: Path | None = None
    """Where uploaded files are kept, by content hash. Unset: ``{data_dir}/files``."""
    max_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    """Largest file; a larger upload gets 413 ``file_too_large`` and nothing of it is kept."""
    allowed_types: list[str] = Field(default_factory=lambda: list(DEFAULT_FILE_TYPES))
    """Content types accepted, as detected from the bytes (what the client claims is ignored).
    Those the server recognises: the defaults. Others get 415 ``unsupported_file_type``."""
    upload_timeout_seconds: float = Field(default=300, gt=0)
    """An upload must arrive whole within this time of its request head: 408 ``request_timeout``."""
    unsent_ttl_seconds: float = Field(default=24 * 3600, gt=0)
    """An upload that no message carries is deleted after this long (``gc_interval_seconds``)."""
    gc_interval_seconds: float = Field(default=3600, gt=0)
    """How often ``mqchat serve`` deletes the uploads that were never sent."""
    thumbnail_px: int = Field(default=320, ge=16, le=2048)
    """The longer side of an image's thumbnail (``GET /v1/files/{id}/thumbnail``)."""

    @field_validator("allowed_types")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(DEFAULT_FILE_TYPES))
        if unknown:
            raise ValueError(f"mqchat cannot recognise {unknown} from their bytes; known: {DEFAULT_FILE_TYPES}")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MQCHAT_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    data_dir: Path = Path("./mqchat-data")
    database_url: str | None = None
    """SQLAlchemy URL. Unset: SQLite at ``{data_dir}/mqchat.db``."""
    database: DatabaseSettings = DatabaseSettings()
    redis_url: str | None = None
    """Redis for cluster mode, e.g. ``redis://127.0.0.1:6379/0``, or through Sentinel
    ``redis+sentinel://[user:password@]host1:26379,host2:26379,host3:26379/SERVICE[/db]``
    (``?sentinel_password=...`` when the Sentinels have one). Unset: a single node."""
    node_id: str | None = Field(default=None, min_length=1, max_length=255, pattern=r"^\S+$")
    """This node's name in the cluster, metrics, logs and health rows. Unset: the host name in
    metrics, logs and health; in cluster mode the host name and process id (give every node its
    own, stable one: ``--node-id``)."""
    cluster: ClusterSettings = ClusterSettings()
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line, with the node id and, where known, the request id,
    client id and command type."""
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """``auto``: uvloop when it is installed (a default dependency where it builds), else asyncio's own."""
    mqtt: MqttSettings = MqttSettings()
    http: HttpSettings = HttpSettings()
    auth: AuthSettings = AuthSettings()
    bridge: BridgeSettings = BridgeSettings()
    limits: LimitsSettings = LimitsSettings()
    tls: TlsSettings = TlsSettings()
    retention: RetentionSettings = RetentionSettings()
    push: PushSettings = PushSettings()
    files: FilesSettings = FilesSettings()
    metrics: MetricsSettings = MetricsSettings()

    @field_validator("redis_url")
    @classmethod
    def _redis_url_readable(cls, value: str | None) -> str | None:
        # Checked here so a mistyped URL stops ``mqchat serve`` at once, naming the problem,
        # instead of a node that retries a Redis it can never reach.
        if value is not None:
            parse_redis_url(value)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = init_settings.init_kwargs.pop("_config_file", None)  # type: ignore[attr-defined]
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Build settings from a TOML file, the environment and explicit overrides."""
        return cls(_config_file=config_file, **overrides)  # type: ignore[call-arg]

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'mqchat.db').resolve()}"

    def resolved_node_id(self) -> str:
        return self.node_id or socket.gethostname()

    def prepare_data_dir(self) -> None:
        """Create the data directory readable by its owner only (it holds the database and the
        signing key), and narrow an existing one."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.data_dir.stat().st_mode & 0o077:
            self.data_dir.chmod(0o700)

    def resolved_files_dir(self) -> Path:
        return self.files.directory or self.data_dir / "files"

    def resolved_secret(self) -> str:
        """The token signing key: configured, or generated once and kept in the data dir."""
        if self.auth.secret:
            return self.auth.secret
        path = self.data_dir / "secret.key"
        if path.exists():
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)  # a key copied in with a looser mode
            return path.read_text().strip()
        self.prepare_data_dir()
        key = secrets.token_urlsafe(48)
        # Create with 0600 from the start so the key is never world-readable.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w") as fh:
            fh.write(key + "\n")
        return key
