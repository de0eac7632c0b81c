"""The router's outer layer: every answer in its route's format, whatever went wrong below.

`/mcp` answers JSON-RPC error bodies (MCP clients show their message to the user); everything
else answers the admin API's JSON shape. Three kinds of failure are mapped here once instead of
in every handler:

- header values that are not UTF-8 (aiohttp hands them over as lone surrogates, which neither
  the token comparison nor the Redis encoder can take) are refused before anything reads them;
- Redis being unreachable becomes a 503 with Retry-After that says so (sessions already bound
  never reach Redis on their request path, so they keep working);
- aiohttp's own 404/405 for unknown paths and methods get a body in the route's format.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.errors import (
    BadRequest,
    ExaiError,
    InternalError,
    MethodNotAllowed,
    RedisUnavailable,
    RouteNotFound,
)

log = logging.getLogger(__name__)

REDIS_RETRY_AFTER = 2


def is_mcp_path(path: str) -> bool:
    return path == "/mcp" or path.startswith("/mcp/")


def error_for(request: web.Request, exc: ExaiError, headers: dict[str, str] | None = None) -> web.Response:
    """`exc` as the route's error body: JSON-RPC on /mcp, the admin JSON shape elsewhere."""
    body = exc.to_jsonrpc(None) if is_mcp_path(request.path) else exc.to_dict()
    return web.Response(
        status=exc.http_status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


def _undecodable_header(request: web.Request) -> str | None:
    """The name of the first header whose value is not valid UTF-8, or None."""
    for raw_name, raw_value in request.raw_headers:
        if not (raw_name.isascii() and raw_value.isascii()):
            break
    else:
        return None  # all ASCII: the usual case, checked on the raw bytes without decoding
    for name, value in request.headers.items():
        try:
            value.encode("utf-8")
            name.encode("utf-8")
        except UnicodeEncodeError:
            return name.encode("utf-8", "backslashreplace").decode("ascii", "replace")
    return None


@web.middleware
async def route_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    bad = _undecodable_header(request)
    if bad is not None:
        return error_for(
            request,
            BadRequest(
                f"The {bad} header holds bytes that are not UTF-8 text",
                hint="Send header values as ASCII (tokens and session ids are ASCII).",
            ),
        )
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("%s %s: Redis unreachable (%s)", request.method, request.path, exc)
        return error_for(
            request,
            RedisUnavailable("The router cannot reach Redis, which holds the session table"),
            headers={"Retry-After": str(REDIS_RETRY_AFTER)},
        )
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_for(
            request,
            MethodNotAllowed(f"{request.method} is not allowed on {request.path}", hint=f"Use {allowed}."),
            headers={"Allow": allowed},
        )
    except web.HTTPNotFound:
        return error_for(request, RouteNotFound(f"Nothing lives at {request.path}"))
    except ExaiError as exc:
        return error_for(request, exc)
    except (web.HTTPException, ConnectionResetError):
        raise  # redirects and the like: aiohttp's own answer is right; a client that left gets none
    except Exception:
        # A bug: still an answer in the route's format, and the traceback in the log.
        log.exception("%s %s failed", request.method, request.path)
        return error_for(
            request,
            InternalError(
                f"The router failed to handle {request.method} {request.path}",
                hint="Retrying may help; logs/router.log in the state folder has the details.",
            ),
        )
