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

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from common.errors import BadRequest, ExaiError, InternalError, PayloadTooLarge, RequestTimeout
from router import prebuilt
from router.fastpath import REQUEST_LINE, FastPath, FastRequest, send_plain
from router.prebuilt import Raw

if TYPE_CHECKING:
    from router.express import Express

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
    """aiohttp's connection handler, with the fast path for `POST /mcp` (router/fastpath.py)
    and framing errors answered in the router's format."""

    __slots__ = (
        "_express", "_fast", "_fast_held", "_fast_memo", "_fast_off", "_fast_paused", "_fast_same",
        "_fast_task",
    )  # fmt: skip

    def __init__(self, manager: Any, *, fast: FastPath | None = None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._fast = fast
        self._fast_task: asyncio.Task[None] | None = None
        self._express: Express | None = None  # a call on the express path (router/express.py)
        self._fast_memo: Any = None  # what router/express.py derived from this client's headers
        self._fast_same: Any = None  # this client's last request head (router/fastpath.py)
        self._fast_held = b""  # what came while a fast call was in flight
        self._fast_off = False  # aiohttp's parser may hold part of a request: it keeps the connection
        self._fast_paused = False

    # --- the fast path -----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._fast_task is not None or self._express is not None:
            # The client sent more before its answer: it is served after the answer.
            if not data:
                return
            self._fast_held += data
            if not self._fast_paused and self.transport is not None:
                self._fast_paused = True
                self.transport.pause_reading()
            return
        fast = self._fast
        if (
            fast is not None
            and not self._fast_off
            and data.startswith(REQUEST_LINE)
            # aiohttp waits for a request (or has had none yet): its parser holds nothing
            and ((self._waiter is not None and not self._waiter.done()) or self._request_count == 0)
            and not self._messages
            and not self._request_in_progress
            and not self._upgraded
            and self._payload_parser is None
            and not self._force_close
            and not self._close
        ):
            request = fast.parse(self, data)
            if request is not None:
                express = fast.express(self, request)
                if express is not None or not fast.held(data):
                    self._fast_start(fast, request, express)
                    return
        count = self._request_count
        super().data_received(data)
        if data and self._request_count == count:
            self._fast_off = True

    def _fast_start(self, fast: FastPath, request: FastRequest, express: Express | None) -> None:
        # aiohttp's keep-alive timer stays armed: when it fires during a fast call,
        # _process_keepalive leaves the connection alone and _fast_end arms it again.
        self._request_in_progress = True  # a graceful shutdown waits for the answer
        self._request_count += 1
        if self._manager is not None:
            self._manager.requests_count += 1
        if express is not None:
            self._express = express  # sent: its answer comes in the upstream connection's callbacks
        else:
            self._fast_task = self._loop.create_task(self._fast_run(fast, request))

    def _express_to_task(self, inner: Callable[[Any], Awaitable[web.StreamResponse]]) -> None:
        """The express call needs the proxy's full path: `inner` (the proxy taking it up) runs
        in the fast path's task."""
        express, self._express = self._express, None
        assert express is not None and self._fast is not None
        self._fast_task = self._loop.create_task(self._fast_run(self._fast, express.request, inner))

    def _express_done(self, keep: bool) -> None:
        """The express call's answer went out (or could not: the client had gone)."""
        self._express = None
        self._fast_end(keep)

    async def _fast_run(
        self,
        fast: FastPath,
        request: FastRequest,
        inner: Callable[[Any], Awaitable[web.StreamResponse]] | None = None,
    ) -> None:
        keep = False
        try:
            resp = await fast.serve(request, inner)
            if isinstance(resp, Raw) and resp._payload_writer is not None and not resp._eof_sent:
                with contextlib.suppress(ConnectionError):
                    await resp.write_eof()  # a stream the proxy left open (its client went away)
            keep = send_plain(request, resp)
        except (asyncio.CancelledError, ConnectionError):
            pass  # the client went away (or the server is shutting down)
        except Exception:
            log.exception("fast path: POST /mcp failed")
        finally:
            self._fast_task = None
        self._fast_end(keep)

    def _fast_end(self, keep: bool) -> None:
        """After a fast-path answer: keep the connection (and serve what came meanwhile) or close it."""
        self._request_in_progress = False
        if self._handler_waiter is not None and not self._handler_waiter.done():
            self._handler_waiter.set_result(None)
        if not keep or self._force_close or self._close or self.transport is None:
            self.force_close()
            return
        loop = self._loop
        close_time = loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        # An armed timer that fires before close_time sets itself again for close_time.
        if self._keepalive_handle is None and self._keepalive_timeout > 0:
            self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
        held, self._fast_held = self._fast_held, b""
        if self._fast_paused:
            self._fast_paused = False
            self.transport.resume_reading()
        if held:
            self.data_received(held)

    def _process_keepalive(self) -> None:
        if self._fast_task is not None or self._express is not None:
            self._keepalive_handle = None  # a fast call is in flight: _fast_end arms it again
            return
        super()._process_keepalive()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._express is not None:
            self._express.blocked = True  # an express answer being copied waits for the drain

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._express is not None:
            self._express.unblock()

    def connection_lost(self, exc: BaseException | None) -> None:
        task, express = self._fast_task, self._express
        if self._manager is not None and self._manager.handler_cancellation:
            if task is not None:
                task.cancel()  # like aiohttp's handlers: the proxy closes the call upstream
            elif express is not None:
                self._express = None
                express.client_gone()  # the same, for a call on the express path
                self._request_in_progress = False
                if self._handler_waiter is not None and not self._handler_waiter.done():
                    self._handler_waiter.set_result(None)
        super().connection_lost(exc)

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

    fast: FastPath | None = None

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, fast=self.fast, **self._kwargs)


class RouterRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer framing errors in the router's format and
    serve plain `POST /mcp` requests on the fast path (`fast_path=False`: aiohttp's path only)."""

    def __init__(self, app: web.Application, *, fast_path: bool = True, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.fast_path = fast_path and prebuilt.SUPPORTED and _FAST_ATTRS

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if type(server) is not web.Server:  # pragma: no cover - a new aiohttp changed its layout
            log.warning("aiohttp made a %s; framing errors keep aiohttp's plain-text answers", type(server))
            return server
        server.__class__ = _Server
        if self.fast_path:
            cast(_Server, server).fast = FastPath(self.app, self.app._client_max_size)
        return server


# The private parts of aiohttp's RequestHandler the fast path reads and sets (checked once).
_SLOTS = {name for cls in RequestHandler.__mro__ for name in getattr(cls, "__slots__", ())}
_FAST_ATTRS = all(
    name in _SLOTS
    for name in (
        "_waiter", "_messages", "_request_in_progress", "_upgraded", "_payload_parser", "_force_close",
        "_close", "_keepalive_handle", "_next_keepalive_close_time", "_keepalive_timeout",
        "_handler_waiter", "_request_count", "_manager", "_loop",
    )
) and hasattr(RequestHandler, "_process_keepalive")  # fmt: skip
