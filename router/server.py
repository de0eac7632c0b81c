"""The router's HTTP server: aiohttp's, with its last-resort answers in the router's format.

A request that breaks HTTP framing (a bad request line, an over-long header, a malformed
chunk, a non-HTTP byte stream) never reaches the middleware in router/middleware.py: aiohttp's
connection handler answers it itself, in `text/plain`. So do a handler that failed after the
middleware gave up and a handler timeout. `RouterRunner` serves the application through a
connection handler whose `handle_error` answers those cases like every other error of the
router: JSON, a JSON-RPC error body (an MCP client shows its message) unless the path is
known to be the admin API, and the project's `[code] what happened. what to do.` wording.
The connection is closed afterwards, as aiohttp does: after a framing error the byte stream
cannot be trusted.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from common.errors import BadRequest, ExaiError, InternalError, PayloadTooLarge, RequestTimeout

log = logging.getLogger(__name__)

__all__ = ["RouterRunner", "framing_error"]


def framing_error(status: int, message: str | None) -> ExaiError:
    """The router's error for a request aiohttp itself refused with `status`."""
    detail = " ".join((message or "").split())[:200]
    if status == 413:
        return PayloadTooLarge(
            f"The request is too large to parse{': ' + detail if detail else ''}",
            hint="Send shorter headers and a body within EXAI_MAX_BODY_BYTES.",
        )
    if status in (408, 504):
        return RequestTimeout(f"The request was not handled in time{': ' + detail if detail else ''}")
    if 400 <= status < 500:
        error = BadRequest(
            f"The request is not valid HTTP/1.1{': ' + detail if detail else ''}",
            hint="Send one well-formed HTTP request per exchange (MCP clients do); "
            "this connection is closed.",
        )
        return error
    return InternalError(
        "The router failed to handle the request",
        hint="Retrying may help; logs/router.log in the state folder has the details.",
    )


class _Handler(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # an answer is already on its way: nothing to add
            return super().handle_error(request, status, exc, message)
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            log.info("refused a malformed request from %s: %s", request.remote, message or exc)
        error = framing_error(status, message)
        path = str(getattr(request, "path", "") or "")
        body = error.to_dict() if path.startswith("/admin") else error.to_jsonrpc(None)
        resp = web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")
        resp.force_close()
        return resp


class _Server(web.Server):
    """aiohttp's low-level server, making `_Handler` connection handlers."""

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class RouterRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer framing errors in the router's format."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if type(server) is not web.Server:  # pragma: no cover - a new aiohttp changed its layout
            log.warning("aiohttp made a %s; framing errors keep aiohttp's plain-text answers", type(server))
            return server
        server.__class__ = _Server
        return server
