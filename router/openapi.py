"""The admin API described as OpenAPI 3.1, served at /admin/openapi.json."""

from __future__ import annotations

from typing import Any

_SESSION = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "instance": {"type": ["string", "null"]},
        "client": {"type": ["string", "null"]},
        "principal": {"type": "string"},
        "era": {"type": "string", "enum": ["handshake", "stateless"]},
        "key": {"type": ["string", "null"], "description": "stateless-era session key"},
        "created": {"type": "number", "description": "Unix time"},
        "last_seen": {"type": "number", "description": "Unix time"},
        "inflight": {"type": "integer", "description": "requests in flight through this router"},
        "total": {"type": "integer"},
        "state": {
            "type": "string",
            "enum": ["working", "idle", "parked"],
            "description": "working: a request in flight; idle: bound to its instance, nothing in "
            "flight; parked: no instance (idle for EXAI_SESSION_PARK_AFTER), the next request binds one",
        },
        "parked_at": {"type": ["number", "null"], "description": "Unix time of the last park, null if bound"},
        "parks": {"type": "integer", "description": "times the session gave its instance back"},
        "resumes": {"type": "integer", "description": "times a parked session was bound again"},
    },
    "required": ["id", "instance", "era", "created", "last_seen", "inflight", "total", "state"],
}
_COUNTS = {
    "type": "object",
    "properties": {k: {"type": "integer"} for k in ("working", "idle", "parked")},
}
_EVICTION = {
    "type": "object",
    "properties": {
        "instance": {"type": "string"},
        "parked": {"type": "array", "items": {"type": "string"}, "description": "sessions parked"},
        "cut": {
            "type": "array",
            "description": "calls still running when the wait ran out; each got a call_cut error",
            "items": {
                "type": "object",
                "properties": {"session": {"type": "string"}, "call": {"type": "string"}},
            },
        },
    },
}
_INSTANCE = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "host": {"type": "string"},
        "port": {"type": "integer"},
        "pid": {"type": "string"},
        "state": {"type": "string"},
        "draining": {"type": "boolean"},
        "session": {"type": ["string", "null"], "description": "session holding the lease"},
        "heartbeat_age": {"type": "number", "description": "seconds since the last heartbeat"},
    },
    "required": ["id", "port", "pid", "state", "session", "heartbeat_age"],
}
_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}, "hint": {"type": "string"}},
}


def _ok(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "401": _ok(_ERROR, "missing or wrong admin token"),
    "403": _ok(_ERROR, "admin API disabled (EXAI_ADMIN_TOKEN unset)"),
    "503": _ok(_ERROR, "Redis unreachable (redis_unavailable; see the Retry-After header)"),
}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_GROUP = {"name": "group", "in": "path", "required": True, "schema": {"type": "string"}}
_LINK_MEMBER = {
    "type": "object",
    "properties": {
        "session": {"type": "string"},
        "principal": {"type": ["string", "null"]},
        "client": {"type": ["string", "null"]},
        "cursor": {"type": "integer", "description": "last event id the member acknowledged"},
        "behind": {"type": "integer", "description": "events after its cursor"},
        "joined_at": {"type": "string"},
        "last_seen": {"type": "string"},
        "chat_context": {
            "type": "boolean",
            "description": "its chats include the group's context by default",
        },
        "handoff_set": {"type": "boolean", "description": "it set a handoff note (link_handoff)"},
    },
}
_LINK_GROUP = {
    "type": "object",
    "properties": {
        "group": {"type": "string"},
        "principal": {"type": ["string", "null"], "description": "owner; others join only via the admin"},
        "events": {"type": "integer", "description": "id of the newest event"},
        "created_at": {"type": "string"},
        "members": {"type": "array", "items": _LINK_MEMBER},
        "reservations": {
            "type": "array",
            "description": "GET /admin/links/{group} only: the file reservations held now",
            "items": {
                "type": "object",
                "properties": {
                    "pattern": {"type": "string"},
                    "session": {"type": "string"},
                    "exclusive": {"type": "boolean"},
                    "expires_at": {"type": "string"},
                },
            },
        },
    },
}
_BAD_GROUP = _ok(_ERROR, "malformed group name (invalid_argument)")

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "EXAI router admin API",
        "version": "1",
        "description": "Sessions and instances of an EXAI fleet. Every call needs "
        "'Authorization: Bearer $EXAI_ADMIN_TOKEN'.",
    },
    "components": {
        "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Session": _SESSION, "Instance": _INSTANCE, "Error": _ERROR, "Eviction": _EVICTION},
    },
    "security": [{"admin": []}],
    "paths": {
        "/admin/sessions": {
            "get": {
                "summary": "List sessions",
                "responses": {
                    "200": _ok(
                        {
                            "type": "object",
                            "properties": {
                                "sessions": {"type": "array", "items": _SESSION},
                                "counts": _COUNTS,
                            },
                        },
                        "all sessions, and how many are working, idle and parked",
                    ),
                    **_ERRORS,
                },
            }
        },
        "/admin/sessions/{id}": {
            "parameters": [_ID],
            "get": {
                "summary": "One session",
                "responses": {"200": _ok(_SESSION, "the session"), "404": _ok(_ERROR, "unknown"), **_ERRORS},
            },
            "delete": {
                "summary": "End a session (its instance is reset and freed)",
                "responses": {
                    "200": _ok({"type": "object", "properties": {"ended": {"type": "string"}}}, "ended"),
                    "404": _ok(_ERROR, "unknown"),
                    **_ERRORS,
                },
            },
        },
        "/admin/sessions/{id}/notify": {
            "parameters": [_ID],
            "post": {
                "summary": "Publish a notification to a session's streams (as an instance would)",
                "description": "Appends the notification to the session's event log; the router "
                "writes it to the session's GET stream and matching subscriptions/listen streams.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "method": {
                                        "type": "string",
                                        "example": "notifications/resources/updated",
                                    },
                                    "params": {"type": "object", "example": {"uri": "exai://notes"}},
                                },
                                "required": ["method"],
                            }
                        }
                    },
                },
                "responses": {
                    "200": _ok(
                        {
                            "type": "object",
                            "properties": {
                                "session": {"type": "string"},
                                "id": {"type": "string", "description": "the event id (SSE id)"},
                            },
                        },
                        "logged and published",
                    ),
                    "400": _ok(_ERROR, "not a notification"),
                    "404": _ok(_ERROR, "unknown session"),
                    **_ERRORS,
                },
            },
        },
        "/admin/sessions/{id}/park": {
            "parameters": [_ID],
            "post": {
                "summary": "Park a session now: its instance is reset and freed, its next request binds one",
                "responses": {
                    "200": _ok({"type": "object", "properties": {"parked": {"type": "string"}}}, "parked"),
                    "404": _ok(_ERROR, "unknown"),
                    "409": _ok(_ERROR, "a request is in flight"),
                    **_ERRORS,
                },
            },
        },
        "/admin/instances": {
            "get": {
                "summary": "List instances",
                "responses": {
                    "200": _ok(
                        {
                            "type": "object",
                            "properties": {"instances": {"type": "array", "items": _INSTANCE}},
                        },
                        "all live instances",
                    ),
                    **_ERRORS,
                },
            }
        },
        "/admin/instances/{id}/drain": {
            "parameters": [_ID],
            "post": {
                "summary": "Drain an instance: it takes no new session; its current one continues",
                "responses": {
                    "200": _ok(
                        {"type": "object", "properties": {"draining": {"type": "string"}}}, "draining"
                    ),
                    "404": _ok(_ERROR, "unknown"),
                    **_ERRORS,
                },
            },
            "delete": {
                "summary": "Undo a drain: the instance takes new sessions again (a restart also undoes it)",
                "responses": {
                    "200": _ok(
                        {
                            "type": "object",
                            "properties": {
                                "undrained": {"type": "string"},
                                "was_draining": {"type": "boolean"},
                            },
                        },
                        "undrained",
                    ),
                    "404": _ok(_ERROR, "unknown"),
                    **_ERRORS,
                },
            },
        },
        "/admin/instances/{id}/evict": {
            "parameters": [
                _ID,
                {
                    "name": "wait",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "number", "minimum": 0, "maximum": 600, "default": 20},
                    "description": "seconds to wait for calls in flight before cutting them",
                },
            ],
            "post": {
                "summary": "Before stopping an instance (exai scale): drain it and park its sessions",
                "responses": {
                    "200": _ok(_EVICTION, "what was parked and cut"),
                    "400": _ok(_ERROR, "bad wait"),
                    **_ERRORS,
                },
            },
        },
        "/admin/links": {
            "get": {
                "summary": "List link groups with their members and cursors",
                "responses": {
                    "200": _ok(
                        {"type": "object", "properties": {"groups": {"type": "array", "items": _LINK_GROUP}}},
                        "all link groups",
                    ),
                    **_ERRORS,
                },
            }
        },
        "/admin/links/{group}": {
            "parameters": [_GROUP],
            "get": {
                "summary": "One link group: members, cursors, reservations",
                "responses": {
                    "200": _ok(_LINK_GROUP, "the group"),
                    "400": _BAD_GROUP,
                    "404": _ok(_ERROR, "unknown"),
                    **_ERRORS,
                },
            },
            "delete": {
                "summary": "Delete a link group and its event log",
                "responses": {
                    "200": _ok({"type": "object", "properties": {"deleted": {"type": "boolean"}}}, "deleted"),
                    "400": _BAD_GROUP,
                    "404": _ok(_ERROR, "unknown"),
                    **_ERRORS,
                },
            },
        },
        "/admin/links/{group}/members": {
            "parameters": [_GROUP],
            "post": {
                "summary": "Link a session into a group (any principal; creates the group)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"session": {"type": "string"}},
                                "required": ["session"],
                            }
                        }
                    },
                },
                "responses": {
                    "200": _ok(
                        {
                            "type": "object",
                            "properties": {
                                "group": {"type": "string"},
                                "session": {"type": "string"},
                                "joined": {"type": "boolean", "description": "false: already a member"},
                            },
                        },
                        "linked",
                    ),
                    "400": _ok(_ERROR, 'malformed group name, or a body that is not {"session": "<id>"}'),
                    "404": _ok(_ERROR, "unknown session"),
                    **_ERRORS,
                },
            },
        },
        "/admin/links/{group}/members/{session}": {
            "parameters": [
                _GROUP,
                {"name": "session", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "delete": {
                "summary": "Remove a session from a group (a leave event with a handoff note)",
                "responses": {
                    "200": _ok({"type": "object", "properties": {"removed": {"type": "boolean"}}}, "removed"),
                    "400": _BAD_GROUP,
                    "404": _ok(_ERROR, "not a member"),
                    **_ERRORS,
                },
            },
        },
        "/admin/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": {"description": "ok"}}}
        },
    },
}
