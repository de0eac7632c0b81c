"""One settings model for the whole fleet, read from the environment and `.env`.

Variable names are the ones EXAI users already have (GLM_API_KEY, REDIS_URL, ...) plus the
EXAI_* fleet settings; `.env.example` documents every one of them.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.errors import ConfigError


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "exai"


def _env(*names: str) -> Any:
    return Field(validation_alias=AliasChoices(*names))


class Settings(BaseSettings):
    """Every knob of the fleet. Field names are Python names; the aliases are the env vars."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    # --- providers -------------------------------------------------------------------------
    glm_api_key: str | None = Field(None, validation_alias=AliasChoices("GLM_API_KEY", "ZHIPUAI_API_KEY"))
    glm_api_url: str = Field("https://api.z.ai/api/paas/v4", validation_alias="GLM_API_URL")
    kimi_api_key: str | None = Field(None, validation_alias=AliasChoices("KIMI_API_KEY", "MOONSHOT_API_KEY"))
    kimi_api_url: str = Field("https://api.moonshot.ai/v1", validation_alias="KIMI_API_URL")
    default_model: str = Field("glm-4.6", validation_alias="DEFAULT_MODEL")
    provider_connect_timeout: float = Field(10.0, gt=0, validation_alias="EXAI_PROVIDER_CONNECT_TIMEOUT")
    provider_read_timeout: float = Field(300.0, gt=0, validation_alias="EXAI_PROVIDER_READ_TIMEOUT")
    provider_max_concurrency: int = Field(8, ge=1, validation_alias="EXAI_PROVIDER_MAX_CONCURRENCY")
    provider_max_retries: int = Field(3, ge=0, validation_alias="EXAI_PROVIDER_MAX_RETRIES")
    provider_retry_budget: float = Field(60.0, gt=0, validation_alias="EXAI_PROVIDER_RETRY_BUDGET")
    allowed_file_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, validation_alias="EXAI_ALLOWED_ROOTS"
    )
    # Context engineering, phases 3-4: notes injected into chat, captured notes, file disclosure.
    notes_budget_tokens: int = Field(1024, ge=0, validation_alias="EXAI_NOTES_BUDGET_TOKENS")
    note_capture: Literal["deterministic", "model", "off"] = Field(
        "deterministic", validation_alias="EXAI_NOTE_CAPTURE"
    )
    file_full_tokens: int = Field(600, ge=0, validation_alias="EXAI_FILE_FULL_TOKENS")

    # --- storage ---------------------------------------------------------------------------
    database_url: str | None = Field(None, validation_alias=AliasChoices("DATABASE_URL", "SUPABASE_DB_URL"))
    redis_url: str | None = Field(None, validation_alias="REDIS_URL")
    redis_prefix: str = Field("exai", min_length=1, validation_alias="EXAI_REDIS_PREFIX")
    db_pool_min: int = Field(1, ge=0, validation_alias="EXAI_DB_POOL_MIN")
    db_pool_max: int = Field(3, ge=1, le=50, validation_alias="EXAI_DB_POOL_MAX")
    db_acquire_timeout: float = Field(5.0, gt=0, validation_alias="EXAI_DB_ACQUIRE_TIMEOUT")
    db_command_timeout: float = Field(10.0, gt=0, validation_alias="EXAI_DB_COMMAND_TIMEOUT")
    db_pgbouncer: bool = Field(False, validation_alias="EXAI_DB_PGBOUNCER")
    spool_max_bytes: int = Field(256 * 1024 * 1024, ge=4096, validation_alias="EXAI_SPOOL_MAX_BYTES")
    spool_full_policy: Literal["block", "refuse"] = Field("block", validation_alias="EXAI_SPOOL_FULL_POLICY")
    spool_block_timeout: float = Field(30.0, gt=0, validation_alias="EXAI_SPOOL_BLOCK_TIMEOUT")
    flush_batch_size: int = Field(500, ge=1, validation_alias="EXAI_FLUSH_BATCH_SIZE")
    flush_interval_ms: int = Field(100, ge=1, validation_alias="EXAI_FLUSH_INTERVAL_MS")
    fsync_window_ms: float = Field(2.0, ge=0, validation_alias="EXAI_FSYNC_WINDOW_MS")
    # When a chat's turns (and other thread writes) count as done: "normal" once their spool row
    # is written to the OS (safe from kill -9; a power loss within the one fdatasync that follows
    # at once can lose them), "full" (strict) once that sync has finished. As EXAI_LINK_SPOOL_SYNC.
    chat_spool_sync: Literal["full", "normal"] = Field("normal", validation_alias="EXAI_CHAT_SPOOL_SYNC")
    history_cache_turns: int = Field(50, ge=0, validation_alias="EXAI_HISTORY_CACHE_TURNS")
    # Redis-assisted client-side caching (instance/storage/tracking.py): a chat trusts the thread
    # and note copies it holds while Redis reports no change to them. Off: every read asks Redis.
    redis_tracking: bool = Field(True, validation_alias="EXAI_REDIS_TRACKING")
    note_max_bytes: int = Field(16 * 1024, ge=64, validation_alias="EXAI_NOTE_MAX_BYTES")
    # Linked sessions: largest link_send body (UTF-8 bytes) and longest file reservation (seconds).
    link_message_max_bytes: int = Field(16 * 1024, ge=64, validation_alias="EXAI_LINK_MESSAGE_MAX_BYTES")
    link_reservation_max_ttl: float = Field(
        24 * 3600.0, gt=0, validation_alias="EXAI_LINK_RESERVATION_MAX_TTL"
    )
    # How long an instance trusts its cached member list of a group (link_send's cheap check).
    link_member_cache_ttl: float = Field(5.0, ge=0, validation_alias="EXAI_LINK_MEMBER_CACHE_TTL")
    # Newest events kept in each group's Redis stream (the whole log is in Postgres).
    link_stream_maxlen: int = Field(10_000, ge=1, validation_alias="EXAI_LINK_STREAM_MAXLEN")
    # When link_send and other group events answer: "normal" once their spool row is written to
    # the OS (safe from kill -9; a power loss within the one fsync that follows at once can lose
    # it), "full" (strict) once that fsync has finished. See docs/LINKED_SESSIONS.md.
    link_spool_sync: Literal["full", "normal"] = Field("normal", validation_alias="EXAI_LINK_SPOOL_SYNC")
    # Announce a group event to the members once its spool row is committed (kill -9 safe),
    # before Postgres stores it (link_inbox then waits, briefly, for such events to be stored).
    link_early_notify: bool = Field(True, validation_alias="EXAI_LINK_EARLY_NOTIFY")
    # The outbox relay of group task events (common/links.outbox_relay): how often each instance
    # looks for group task changes whose event never reached a spool (their instance died between
    # the write and the spool), how old such a change must be (the usual path stores its event
    # within milliseconds), and how far back it looks (seconds).
    link_outbox_interval: float = Field(5.0, gt=0, validation_alias="EXAI_LINK_OUTBOX_INTERVAL")
    link_outbox_grace: float = Field(10.0, ge=0, validation_alias="EXAI_LINK_OUTBOX_GRACE")
    link_outbox_horizon: float = Field(24 * 3600.0, gt=0, validation_alias="EXAI_LINK_OUTBOX_HORIZON")
    # Ports of the embedded Postgres / Redis that `exai up` runs when DATABASE_URL / REDIS_URL are unset.
    embedded_pg_port: int = Field(8432, ge=1, le=65535, validation_alias="EXAI_EMBEDDED_PG_PORT")
    embedded_redis_port: int = Field(8379, ge=1, le=65535, validation_alias="EXAI_EMBEDDED_REDIS_PORT")

    # --- context engineering (instance/context) ---------------------------------------------
    thread_max_turns: int = Field(20, ge=2, le=10_000, validation_alias="EXAI_THREAD_MAX_TURNS")
    context_history_share: float = Field(0.5, gt=0, le=1, validation_alias="EXAI_CONTEXT_HISTORY_SHARE")
    context_recent_turns: int = Field(4, ge=0, le=1000, validation_alias="EXAI_CONTEXT_RECENT_TURNS")
    context_strip: bool = Field(True, validation_alias="EXAI_CONTEXT_STRIP")
    context_strip_min_words: int = Field(20, ge=6, le=10_000, validation_alias="EXAI_CONTEXT_STRIP_MIN_WORDS")
    context_summaries: bool = Field(False, validation_alias="EXAI_CONTEXT_SUMMARIES")
    # Per-model overrides, JSON: {"glm-4.5-flash": {"history_share": 0.25, "recent_turns": 2}}
    context_model_overrides: dict[str, dict[str, float]] = Field(
        default_factory=dict, validation_alias="EXAI_CONTEXT_MODEL_OVERRIDES"
    )

    # --- fleet -----------------------------------------------------------------------------
    router_host: str = Field("127.0.0.1", validation_alias="EXAI_ROUTER_HOST")
    router_port: int = Field(8079, ge=1, le=65535, validation_alias="EXAI_ROUTER_PORT")
    # Router processes sharing EXAI_ROUTER_PORT (SO_REUSEPORT; the kernel spreads connections).
    router_processes: int = Field(1, ge=1, le=64, validation_alias="EXAI_ROUTER_PROCESSES")
    # Plain `POST /mcp` requests skip aiohttp's request/response objects (router/fastpath.py);
    # false sends every request through aiohttp's own path (same behaviour, more CPU per call).
    router_fast_path: bool = Field(True, validation_alias="EXAI_ROUTER_FAST_PATH")
    instances: int = Field(5, ge=0, validation_alias="EXAI_INSTANCES")
    max_instances: int = Field(16, ge=1, le=256, validation_alias="EXAI_MAX_INSTANCES")
    instance_base_port: int = Field(8100, ge=1, le=65000, validation_alias="EXAI_INSTANCE_BASE_PORT")
    # Niceness an instance adds to its own at start (os.nice): above 0, the router (and Redis,
    # Postgres) get a busy machine's CPU before the instances, so one session's heavy work
    # (building a large context, a tools/list) does not hold up the routing of every other's.
    instance_nice: int = Field(5, ge=0, le=19, validation_alias="EXAI_INSTANCE_NICE")
    instance_id: str | None = Field(None, validation_alias="EXAI_INSTANCE_ID")
    instance_port: int | None = Field(None, ge=1, le=65535, validation_alias="EXAI_INSTANCE_PORT")
    instance_num: int | None = Field(None, ge=0, le=1000, validation_alias="EXAI_INSTANCE_NUM")
    # Address an instance listens on, and the one it registers for routers to connect to (another
    # host's routers need a routable address; unset: the listen address, or the host name when
    # listening on every interface).
    instance_host: str = Field("127.0.0.1", min_length=1, validation_alias="EXAI_INSTANCE_HOST")
    instance_advertise_host: str | None = Field(None, validation_alias="EXAI_INSTANCE_ADVERTISE_HOST")
    state_dir: Path = Field(default_factory=_default_state_dir, validation_alias="EXAI_STATE_DIR")
    admin_token: str | None = Field(None, validation_alias="EXAI_ADMIN_TOKEN")
    auth_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="EXAI_AUTH_TOKENS"
    )
    internal_token: str | None = Field(None, validation_alias="EXAI_INTERNAL_TOKEN")
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="EXAI_ALLOWED_ORIGINS"
    )
    heartbeat_interval: float = Field(2.0, gt=0, validation_alias="EXAI_HEARTBEAT_INTERVAL")
    heartbeat_ttl: float = Field(6.0, gt=0, validation_alias="EXAI_HEARTBEAT_TTL")
    allocation_deadline: float = Field(10.0, ge=0, validation_alias="EXAI_ALLOCATION_DEADLINE")
    autostart_spares: bool = Field(True, validation_alias="EXAI_AUTOSTART_SPARES")
    # Expiry: a session without requests for this long is forgotten (parked sessions included).
    session_idle_timeout: float = Field(7 * 86400.0, gt=0, validation_alias="EXAI_SESSION_IDLE_TIMEOUT")
    # Parking: a session with nothing in flight for this long gives its instance back.
    session_park_after: float = Field(30.0, gt=0, validation_alias="EXAI_SESSION_PARK_AFTER")
    lease_ttl: float = Field(30.0, gt=0, validation_alias="EXAI_LEASE_TTL")
    # Plain 2026-07-28 tool calls served by the SDK's handler straight from the instance's gate
    # (instance/fastcall.py); false sends every call through the SDK's whole HTTP entry.
    direct_calls: bool = Field(True, validation_alias="EXAI_DIRECT_CALLS")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, validation_alias="EXAI_MAX_BODY_BYTES")
    # Silence allowed on a POST response from an instance (SSE pings come every 15 s). GET
    # streams (server-to-client notifications) have no read timeout: they may idle for hours.
    upstream_read_timeout: float = Field(120.0, gt=0, validation_alias="EXAI_UPSTREAM_READ_TIMEOUT")
    # Slow clients: seconds a connection may sit idle or half-way through its request headers,
    # and seconds a request body may take to arrive, before the router gives up on it.
    header_timeout: float = Field(30.0, gt=0, validation_alias="EXAI_HEADER_TIMEOUT")
    body_timeout: float = Field(30.0, gt=0, validation_alias="EXAI_BODY_TIMEOUT")
    drain_timeout: float = Field(20.0, gt=0, validation_alias="EXAI_DRAIN_TIMEOUT")
    # Router-held notification streams (router/streams.py) and the per-session event log.
    stream_keepalive: float = Field(15.0, gt=0, validation_alias="EXAI_STREAM_KEEPALIVE")
    streams_per_session: int = Field(4, ge=1, le=64, validation_alias="EXAI_STREAMS_PER_SESSION")
    stream_retry_ms: int = Field(2000, ge=0, validation_alias="EXAI_STREAM_RETRY_MS")
    notify_log_maxlen: int = Field(1000, ge=1, validation_alias="EXAI_NOTIFY_LOG_MAXLEN")
    notify_buffer: int = Field(1000, ge=1, validation_alias="EXAI_NOTIFY_BUFFER")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", validation_alias="EXAI_LOG_LEVEL")
    # The event loop watchdog (common/loopwatch.py): a loop that does not turn for this many
    # milliseconds is logged with the blocking stack and counted in the metrics; 0 turns it off.
    loop_stall_ms: float = Field(100.0, ge=0, validation_alias="EXAI_LOOP_STALL_MS")
    # Diagnostics: also log every file open, import, subprocess and name lookup made on an event
    # loop, however short (a Python audit hook, some cost per audited event; tests turn it on).
    loop_audit: bool = Field(False, validation_alias="EXAI_LOOP_AUDIT")
    # TEST ONLY (the soak run, tests/soak): every tool call keeps this many bytes referenced for
    # the life of the instance, a deliberate leak the soak must catch. Never set it in production.
    test_leak_per_call_bytes: int = Field(0, ge=0, validation_alias="EXAI_TEST_LEAK_PER_CALL_BYTES")
    # TEST ONLY (tests/instance/test_chat_commit.py): a file the spool's thread reads before each
    # commit while it exists: "fail" fails the commit as a disk error would, "delay SECONDS"
    # holds it that long. Never set it in production.
    test_spool_fault_file: str | None = Field(None, validation_alias="EXAI_TEST_SPOOL_FAULT_FILE")

    # --- exai-bridge (stdio clients) ----------------------------------------------------------
    # The router URL (unset: this machine's EXAI_ROUTER_PORT), the session name (unset: one new
    # name per bridge process), the bearer token, and how long a request waits for a router that
    # does not accept connections (restarting, or down) before the client gets an error.
    bridge_url: str | None = Field(None, validation_alias="EXAI_BRIDGE_URL")
    bridge_session: str | None = Field(None, validation_alias="EXAI_BRIDGE_SESSION")
    bridge_token: str | None = Field(None, validation_alias="EXAI_BRIDGE_TOKEN")
    bridge_retry_seconds: float = Field(60.0, ge=0, validation_alias="EXAI_BRIDGE_RETRY_SECONDS")

    @field_validator("auth_tokens", "allowed_origins", mode="before")
    @classmethod
    def _split_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("allowed_file_roots", mode="before")
    @classmethod
    def _split_paths(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [Path(p.strip()).expanduser() for p in v.split(os.pathsep) if p.strip()]
        return v

    @field_validator("database_url")
    @classmethod
    def _check_dsn(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"not a valid postgresql:// URL ({exc})") from None
        if parts.scheme not in ("postgres", "postgresql") or not (parts.hostname or parts.path):
            raise ValueError("expected postgresql://user:password@host:port/dbname")
        return v

    @field_validator("redis_url")
    @classmethod
    def _check_redis(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018
        except ValueError as exc:
            raise ValueError(f"not a valid redis:// URL ({exc})") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("expected redis://host:port/db (or rediss://, unix://)")
        return v

    @model_validator(mode="after")
    def _check_fleet(self) -> Settings:
        if self.instances > self.max_instances:
            raise ValueError(
                f"EXAI_INSTANCES={self.instances} is more than EXAI_MAX_INSTANCES={self.max_instances}"
            )
        if self.db_pool_min > self.db_pool_max:
            raise ValueError("EXAI_DB_POOL_MIN is larger than EXAI_DB_POOL_MAX")
        if self.heartbeat_ttl <= self.heartbeat_interval:
            raise ValueError("EXAI_HEARTBEAT_TTL must be longer than EXAI_HEARTBEAT_INTERVAL")
        return self

    # --- derived ---------------------------------------------------------------------------
    @cached_property
    def embedded_services(self) -> bool:
        """True when the fleet runs its own Postgres and Redis (no URLs configured)."""
        return self.database_url is None and self.redis_url is None

    def instance_port_for(self, num: int) -> int:
        return self.instance_base_port + num

    @property
    def instance_advertise(self) -> str:
        """The address an instance registers: EXAI_INSTANCE_ADVERTISE_HOST, else where it listens
        (this host's name when it listens on every interface)."""
        if self.instance_advertise_host:
            return self.instance_advertise_host
        if self.instance_host in ("0.0.0.0", "::"):
            import socket

            return socket.gethostname()
        return self.instance_host

    @property
    def supervisor_socket(self) -> Path:
        return self.state_dir / "supervisor.sock"

    @property
    def supervisor_conf(self) -> Path:
        return self.state_dir / "supervisord.conf"


def _alias_for(loc: tuple[Any, ...]) -> str:
    if not loc:
        return "configuration"
    name = str(loc[0])
    field = Settings.model_fields.get(name)
    if field is not None and field.validation_alias is not None:
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            return str(alias.choices[0])
        return str(alias)
    return name


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning validation errors into one ConfigError line per problem."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            var = _alias_for(tuple(err.get("loc", ())))
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            value = err.get("input")
            secret = any(w in var for w in ("URL", "KEY", "TOKEN"))
            plain = isinstance(value, str | int | float) and var != "configuration" and not secret
            shown = f" (got {value!r})" if plain else ""
            problems.append(f"{var}: {msg}{shown}")
        raise ConfigError("; ".join(problems)) from None
