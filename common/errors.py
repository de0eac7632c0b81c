"""Every error the fleet reports, in one tree.

Each class says in its docstring what happened; each carries the JSON-RPC code and HTTP status a
client sees, and a hint that says what to do. Callers catch a family (`StorageError`) or a leaf
(`VersionConflict`). Messages are written for the person reading them in their MCP client.
"""

from __future__ import annotations

from typing import Any, ClassVar

# JSON-RPC 2.0 reserved codes, and the server range we use for fleet-specific errors.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000


def _sentence(text: str) -> str:
    """`text` ending in a full stop (or the ?/! it already has), so parts never run together."""
    text = text.strip()
    if not text or text.endswith((".", "?", "!")):
        return text
    return text + "."


class ExaiError(Exception):
    """Something the fleet could not do, explained for its user."""

    code: ClassVar[str] = "exai_error"
    jsonrpc_code: ClassVar[int] = INTERNAL_ERROR
    http_status: ClassVar[int] = 500
    default_hint: ClassVar[str | None] = None

    def __init__(self, message: str, *, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.details = details

    def __str__(self) -> str:
        """`what happened. what to do.`: each part one sentence ending in a full stop."""
        if not self.hint:
            return _sentence(self.message)
        return f"{_sentence(self.message)} {_sentence(self.hint)}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape used in tool errors and admin responses."""
        out: dict[str, Any] = {"error": self.code, "message": _sentence(self.message)}
        if self.hint:
            out["hint"] = _sentence(self.hint)
        if self.details:
            out["details"] = self.details
        return out

    def to_jsonrpc(self, request_id: Any = None) -> dict[str, Any]:
        return {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {"code": self.jsonrpc_code, "message": str(self), "data": self.to_dict()},
        }


class InternalError(ExaiError):
    """Something failed that should not have: a bug or an unexpected state (the log has the details)."""

    code = "internal_error"
    default_hint = "Retrying may help; the instance log has the details."


# --- configuration -------------------------------------------------------------------------
class ConfigError(ExaiError):
    """A setting is missing or malformed; the message names the variable."""

    code = "config_error"


# --- fleet control (exai CLI, supervisord, embedded servers) ----------------------------------
class FleetControlError(ExaiError):
    """Starting, stopping or scaling the fleet's processes failed."""

    code = "fleet_control_error"
    jsonrpc_code = SERVER_ERROR
    http_status = 503


class SupervisorUnavailable(FleetControlError):
    """supervisord does not answer on its control socket: the fleet is not running."""

    code = "supervisor_unavailable"
    default_hint = "Start the fleet with `exai up`."


class SupervisorFault(FleetControlError):
    """supervisord refused or failed a control call (bad name, spawn error, ...)."""

    code = "supervisor_fault"


class EmbeddedServiceError(FleetControlError):
    """An embedded Postgres or Redis could not be prepared or did not come up."""

    code = "embedded_service_error"


# --- input ---------------------------------------------------------------------------------
class InvalidArgument(ExaiError):
    """A tool or API argument is malformed or out of range."""

    code = "invalid_argument"
    jsonrpc_code = INVALID_PARAMS
    http_status = 400


class NotFound(ExaiError):
    """The thing asked for does not exist (or is not visible to this session)."""

    code = "not_found"
    jsonrpc_code = INVALID_PARAMS
    http_status = 404


# --- storage -------------------------------------------------------------------------------
class StorageError(ExaiError):
    """Postgres, Redis or the local spool failed."""

    code = "storage_error"
    jsonrpc_code = SERVER_ERROR
    http_status = 503


class StorageUnavailable(StorageError):
    """Postgres cannot be reached right now; the operation was not performed."""

    code = "storage_unavailable"
    default_hint = "Nothing was changed. Retry in a few seconds; check that Postgres (DATABASE_URL) is up."


class SpoolFull(StorageError):
    """The local write-behind spool reached its size limit and the policy is to refuse."""

    code = "spool_full"
    default_hint = (
        "Postgres has been unreachable long enough to fill the spool; restore it, "
        "or raise EXAI_SPOOL_MAX_BYTES."
    )


class TaskNotFound(NotFound):
    """No task has that id in this scope."""

    code = "task_not_found"
    default_hint = (
        "Check the id with task_list; a link group's task is reached with group=<name> "
        "(task_list(scope='group', group=...) lists them)."
    )


class NoteNotFound(NotFound):
    """No note has that key in this scope."""

    code = "note_not_found"


class ThreadNotFound(NotFound):
    """No conversation thread has that continuation_id."""

    code = "thread_not_found"
    default_hint = "Start a new thread by calling chat without continuation_id."


class GitFailed(ExaiError):
    """git could not read the repository a workflow tool was pointed at."""

    code = "git_failed"
    jsonrpc_code = SERVER_ERROR
    http_status = 502
    default_hint = (
        "Check that `path` is inside a git working tree and that git is installed on the fleet's host."
    )


class SessionBusy(ExaiError):
    """An admin action needs a session with nothing in flight, and it is working."""

    code = "session_busy"
    http_status = 409
    default_hint = "Try again when its calls have finished."


class VersionConflict(ExaiError):
    """An update carried a version that is no longer current: someone else changed the row."""

    code = "version_conflict"
    jsonrpc_code = SERVER_ERROR
    http_status = 409
    default_hint = "Read the task again (task_get) and retry with its current version."


class InvalidTransition(InvalidArgument):
    """A task state change that the lifecycle does not allow."""

    code = "invalid_transition"


class NoteTooLarge(InvalidArgument):
    """A note body exceeds the configured size limit."""

    code = "note_too_large"


# --- providers -----------------------------------------------------------------------------
class ProviderError(ExaiError):
    """The LLM provider (GLM or Kimi) did not give a usable answer."""

    code = "provider_error"
    jsonrpc_code = SERVER_ERROR
    http_status = 502


class ProviderNotConfigured(ProviderError):
    """No API key is set for the provider that serves the requested model."""

    code = "provider_not_configured"
    http_status = 500


class ProviderRateLimited(ProviderError):
    """The provider kept answering 429 beyond the retry budget."""

    code = "provider_rate_limited"
    http_status = 429


class ProviderUnavailable(ProviderError):
    """The provider answered 5xx or could not be reached, beyond the retry budget."""

    code = "provider_unavailable"


class ProviderTimeout(ProviderError):
    """The provider did not answer within the configured timeout."""

    code = "provider_timeout"
    http_status = 504


class ProviderRejected(ProviderError):
    """The provider refused the request (4xx other than 429): bad key, bad model, too long."""

    code = "provider_rejected"
    http_status = 400


# --- routing -------------------------------------------------------------------------------
class RoutingError(ExaiError):
    """The router could not deliver a request to an instance."""

    code = "routing_error"
    jsonrpc_code = SERVER_ERROR
    http_status = 502


class NoFreeInstance(RoutingError):
    """Every running instance serves another session and none freed up before the deadline."""

    code = "no_free_instance"
    http_status = 503
    default_hint = (
        "Every instance is serving another session. Retry after the Retry-After delay, end idle "
        "sessions (exai sessions / DELETE /admin/sessions/{id}), or add instances with `exai scale N`."
    )


class InstanceFenced(RoutingError):
    """An instance refused a request or a reset: it serves another session (fencing token)."""

    code = "instance_fenced"
    http_status = 409
    default_hint = "The router moves the session to another instance; retry if this reached you."


class SessionNotFound(RoutingError):
    """The Mcp-Session-Id is unknown, expired, or belongs to another principal."""

    code = "session_not_found"
    jsonrpc_code = INVALID_REQUEST
    http_status = 404
    default_hint = "Start a new session: send initialize without an Mcp-Session-Id."


class InstanceLost(RoutingError):
    """The instance serving the request died while the request was in flight."""

    code = "instance_lost"
    default_hint = (
        "The call may or may not have run. Your session was moved to another instance; "
        "retry the call if it is safe to repeat."
    )


class CallCut(InstanceLost):
    """An operator scaled the fleet down while the call was running, and its wait ran out."""

    code = "call_cut"
    default_hint = (
        "The call may or may not have run. Your session continues on another instance; "
        "retry the call if it is safe to repeat."
    )


class Unauthorized(RoutingError):
    """A bearer token is missing or wrong."""

    code = "unauthorized"
    jsonrpc_code = INVALID_REQUEST
    http_status = 401


class Forbidden(RoutingError):
    """The request is not allowed from here (Origin, principal)."""

    code = "forbidden"
    jsonrpc_code = INVALID_REQUEST
    http_status = 403


class PayloadTooLarge(RoutingError):
    """The request body exceeds EXAI_MAX_BODY_BYTES."""

    code = "payload_too_large"
    jsonrpc_code = INVALID_REQUEST
    http_status = 413


class BadRequest(RoutingError):
    """The HTTP request or its JSON-RPC body is malformed."""

    code = "bad_request"
    jsonrpc_code = INVALID_REQUEST
    http_status = 400


class UnsupportedProtocolVersion(BadRequest):
    """The MCP protocol version is unknown, or the request mixes the two protocol eras."""

    code = "unsupported_protocol_version"


class ParseError(BadRequest):
    """The body is not valid JSON."""

    code = "parse_error"
    jsonrpc_code = PARSE_ERROR


class RedisUnavailable(RoutingError):
    """Redis, which holds the session table, the leases and the instance registry, is unreachable."""

    code = "redis_unavailable"
    http_status = 503
    default_hint = (
        "Retry after the Retry-After delay; sessions that are already open keep working. "
        "Check that Redis (REDIS_URL) is up."
    )


class MethodNotAllowed(BadRequest):
    """The HTTP method is not one this path serves."""

    code = "method_not_allowed"
    http_status = 405


class RouteNotFound(BadRequest):
    """No endpoint lives at this path."""

    code = "route_not_found"
    http_status = 404
    default_hint = "MCP clients connect to /mcp; the admin API is listed at /admin/openapi.json."


class RequestTimeout(BadRequest):
    """The client did not send its whole request in time."""

    code = "request_timeout"
    http_status = 408
    default_hint = "Send the request again on a new connection (EXAI_BODY_TIMEOUT sets the limit)."


class UnknownTool(NotFound):
    """A tools/call named a tool this server does not have."""

    code = "unknown_tool"


class TooManyStreams(RoutingError):
    """The session already holds as many notification streams as EXAI_STREAMS_PER_SESSION allows."""

    code = "too_many_streams"
    jsonrpc_code = INVALID_REQUEST
    http_status = 409
    default_hint = "Close a stream this session no longer reads, or raise EXAI_STREAMS_PER_SESSION."


# --- exai-bridge (stdio clients) -------------------------------------------------------------
class BridgeError(RoutingError):
    """exai-bridge could not carry a message between its stdio client and the router."""

    code = "bridge_error"


class RouterUnreachable(BridgeError):
    """The router did not accept a connection for EXAI_BRIDGE_RETRY_SECONDS; nothing was sent."""

    code = "router_unreachable"
    http_status = 503
    default_hint = "Nothing was sent. Start the fleet with `exai up` (or check EXAI_BRIDGE_URL), then retry."


class RouterConnectionLost(BridgeError):
    """The connection to the router broke while a request was in flight."""

    code = "router_connection_lost"
    default_hint = "The call may or may not have run; retry it if it is safe to repeat."


class ShuttingDown(ExaiError):
    """The process is stopping and takes no new work."""

    code = "shutting_down"
    jsonrpc_code = SERVER_ERROR
    http_status = 503
    default_hint = "Retry; the router moves the session to another instance."


# --- linked sessions -----------------------------------------------------------------------
class LinkForbidden(ExaiError):
    """A session tried to join (or act in) a link group its principal is not allowed into."""

    code = "link_forbidden"
    jsonrpc_code = INVALID_PARAMS
    http_status = 403
    default_hint = (
        "Only sessions of the group's principal may join; "
        "the admin can link others (POST /admin/links/{group}/members)."
    )


class NotLinked(NotFound):
    """The session is not a member of the link group it named."""

    code = "not_linked"
    default_hint = "Join the group first with link_join (link_status lists your groups)."


class ReservationConflict(ExaiError):
    """An advisory file reservation overlaps an exclusive one held by another session."""

    code = "reservation_conflict"
    jsonrpc_code = SERVER_ERROR
    http_status = 409
    default_hint = (
        "Wait until it expires, ask the holder (link_send) to release it, or reserve non-exclusively."
    )


class MessageTooLarge(InvalidArgument):
    """A link message body exceeds EXAI_LINK_MESSAGE_MAX_BYTES."""

    code = "message_too_large"
