"""The contract between the router and its instances: headers, internal endpoints, states.

The router adds the X-Exai-* headers to every request it forwards; an instance refuses any
request without the right internal token, and reads the session it serves from the headers.
"""

from __future__ import annotations

from typing import Final, Literal

MCP_PATH: Final = "/mcp"

# Headers the router sets on forwarded requests (clients' copies are stripped first).
INTERNAL_TOKEN_HEADER: Final = "X-Exai-Internal-Token"
SESSION_HEADER: Final = "X-Exai-Session"  # the router's session id
PRINCIPAL_HEADER: Final = "X-Exai-Principal"  # who opened the session (token name or "local")
CLIENT_HEADER: Final = "X-Exai-Client"  # clientInfo.name, when known
ERA_HEADER: Final = "X-Exai-Era"  # "handshake" | "stateless"
# Fencing token (lease generation) of the router's binding. An instance bound to one session
# refuses requests for another, and a reset that does not name its session and this token.
FENCE_HEADER: Final = "X-Exai-Fence"
# Set on an instance's 409 when it refused a request or reset because it serves another session.
FENCED_HEADER: Final = "X-Exai-Fenced"

# The principal of a client that uses the admin token on /mcp: it sees every principal's threads,
# notes and tasks. Token names in EXAI_AUTH_TOKENS cannot start with "@", so none can claim it.
ADMIN_PRINCIPAL: Final = "@admin"


def principals_of(auth_tokens: list[str]) -> dict[str, str]:
    """token -> principal name, from EXAI_AUTH_TOKENS entries (`name=token`, or a bare token)."""
    import hashlib

    out: dict[str, str] = {}
    for entry in auth_tokens:
        name, sep, token = entry.partition("=")
        if not sep:
            token = entry
            name = "token-" + hashlib.sha256(entry.encode()).hexdigest()[:8]
        out[token] = name
    return out


# Header a client may send to name its session explicitly (2026-07-28 era; same as /mcp/s/{name}).
SESSION_KEY_HEADER: Final = "X-Exai-Session-Key"

# MCP headers the router must preserve or translate.
MCP_SESSION_ID: Final = "Mcp-Session-Id"
MCP_PROTOCOL_VERSION: Final = "MCP-Protocol-Version"
MCP_METHOD: Final = "Mcp-Method"
MCP_NAME: Final = "Mcp-Name"
LAST_EVENT_ID: Final = "Last-Event-ID"

# Instance endpoints outside MCP (all require the internal token).
INTERNAL_HEALTH: Final = "/internal/health"  # GET -> {"id", "state", "session", "inflight"}
INTERNAL_RESET: Final = "/internal/reset"  # POST -> forget the bound session, close MCP sessions
# (the reset must name the bound session and its fence in SESSION_HEADER / FENCE_HEADER)
INTERNAL_DRAIN: Final = "/internal/drain"  # POST -> stop taking new sessions; DELETE -> take them again
INTERNAL_METRICS: Final = "/internal/metrics"  # GET -> Prometheus text: chat stage timings
# Token-free probes of an instance for an orchestrator (Kubernetes): the state, nothing else.
PROBE_LIVE: Final = "/healthz"  # GET -> 200 {"state"} while the process answers
PROBE_READY: Final = "/readyz"  # GET -> 200 when "ready", 503 while starting, draining or stopping

Era = Literal["handshake", "stateless"]
InstanceState = Literal["starting", "ready", "draining", "stopping"]

# Fields of the instance registry hash (Keys.instance(id)); the key has a TTL refreshed by the
# heartbeat, so a dead instance disappears within EXAI_HEARTBEAT_TTL seconds.
# Values are strings; "session" is "" while unbound ("fence" is then ""); started_at and
# heartbeat are Unix epoch seconds.
REGISTRY_FIELDS: Final = (
    "id",
    "host",
    "port",
    "pid",
    "state",
    "session",
    "started_at",
    "heartbeat",
    "version",
    "fence",
)

# supervisord naming, shared by `exai` (rendering the config, scaling) and the router (spares).
SUPERVISOR_GROUP: Final = "instances"
INSTANCE_PROGRAM: Final = "instance"


def instance_process_name(num: int) -> str:
    """supervisord's process name for instance number `num` (1-based)."""
    return f"{INSTANCE_PROGRAM}_{num:02d}"


# Instances on other hosts: each registers the address routers should connect to (its
# EXAI_INSTANCE_ADVERTISE_HOST), and its registry id names that host, so that instance_01 of
# two hosts never share a registry entry. On the default loopback address the id is the
# supervisord process name, as it always was.
DEFAULT_INSTANCE_HOST: Final = "127.0.0.1"


def registry_id(name: str, advertise_host: str) -> str:
    """The registry id of instance `name` reached at `advertise_host`."""
    return name if advertise_host == DEFAULT_INSTANCE_HOST else f"{name}@{advertise_host}"


def local_name(instance_id: str, advertise_host: str) -> str | None:
    """The process name behind registry id `instance_id` if it is advertised at `advertise_host`."""
    name, sep, host = instance_id.partition("@")
    if not sep:
        return name if advertise_host == DEFAULT_INSTANCE_HOST else None
    return name if host == advertise_host else None
