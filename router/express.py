"""A proxied call served without a task: the usual `POST /mcp`, start to answer in callbacks.

The fast path (router/fastpath.py) took a complete `POST /mcp` off the connection. When its
session is cached here and bound to a known instance, and an idle pooled connection to that
instance is free, `start` sends the call right away, from the connection's `data_received`,
and follows the answer from the upstream connection's callbacks: no task, no coroutine chain,
no future per wait. A whole JSON answer (the 2026-07-28 era's usual answer) is written to the
client in one write the moment its last byte has come; a chunked one (the handshake era's SSE)
is copied piece by piece as it comes, the head with the first piece (or alone after HEAD_HOLD)
and the last piece with the end marker, framed as the proxy frames it (router/prebuilt.py).
An SSE answer to a request ends with the event holding its response (router/sseresponse.py):
that event and the end marker go in one write, and the instance's own end, which comes a
moment later, is read after (`Response.drain`), so an SSE call usually costs one write to
the client, as a JSON one does. While the client's
connection is full, copying waits for it to drain and the instance's connection stops being
read once HIGH_WATER bytes wait (router/upstream.py), as with the proxy's own copying.

Everything else is the proxy's own code, unchanged:

- before anything is sent (an Origin or token to refuse, a body that is not one JSON-RPC
  object, a session to open, resume or fetch from Redis, a binding to look up, no idle
  connection, a connection the instance had dropped), `start` returns None and the request
  takes the fast path's task through `Proxy.handle`, from the beginning;
- after the call went out, anything but an answer relayed as it came (a lost or silent
  instance before the answer began, a fenced or unknown session, a refusal, a JSON answer
  over HIGH_WATER) hands the call, as sent, to
  `Proxy._forward` in a task (`Sent`), which carries on exactly as if it had sent the call
  itself: failover, re-send of calls that never arrived, error bodies, streaming;
- an instance lost or silent in the middle of a streamed answer gets the proxy's treatment
  here (an SSE error event for a request, the end marker, a check of the instance);
- a scale-down that cuts the call (`Call.task.cancel()`) hands it over the same way, and the
  proxy answers the cut (once a streamed answer has begun: an SSE error event and the end,
  here); a client that goes away closes the upstream connection, which tells the instance to
  cancel the call.

Bookkeeping (calls in flight, the session's counters and last-seen time, request and stage
metrics) is the proxy's, done at the same points.

What the client's headers say is kept per connection (`_Derived`), and so is what its last
body said (`_SameBody`): a body that is the same bytes but for the request's integer id is
not parsed again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from common import protocol as p
from common.errors import CallCut, ExaiError, InstanceLost
from router import prebuilt
from router.jsonrpc import Message, is_jsonrpc_type, parse_message, sse_error_event
from router.proxy import JSON_WHOLE_MAX, _answer_fields, _lost, client_fields, key_of
from router.sessions import Call, Session
from router.sseresponse import ResponseWatch
from router.upstream import HIGH_WATER, Lost, Response
from router.versions import era_of

if TYPE_CHECKING:
    from router.fastpath import FastRequest
    from router.proxy import Proxy
    from router.registry import Instance

__all__ = ["Express", "Sent", "start"]

log = logging.getLogger("router.proxy")  # the proxy's messages, from the proxy's logger

_JSON_WHOLE_MAX = HIGH_WATER  # larger whole answers (to 1 MiB) go through the proxy's reading
HEAD_HOLD = 0.05  # seconds a streamed answer's head waits for its first piece


class Sent:
    """A call `Express` sent, for `Proxy._forward` to take up as its first attempt."""

    __slots__ = ("call", "generation", "sent", "target", "upstream")

    def __init__(
        self, call: Call, generation: int, target: Instance, sent: float, upstream: Response
    ) -> None:
        self.call = call
        self.generation = generation
        self.target = target
        self.sent = sent
        self.upstream = upstream


class _Derived:
    """What a client's headers say, as the proxy reads them: the same for every call that
    sends the same headers (Content-Length aside), so kept per connection (`memo_key`)."""

    __slots__ = ("block", "json", "key", "last", "name", "principal", "sid", "version")

    def __init__(self, proxy: Proxy, request: FastRequest) -> None:
        headers = request.headers
        proxy.guard.check_origin(request)  # type: ignore[arg-type]
        self.key = request.memo_key
        self.principal = proxy.guard.principal(request)  # type: ignore[arg-type]
        ctype = headers.get("Content-Type", "")
        self.json = ctype.split(";")[0].strip().lower() == "application/json"
        self.version = headers.get(p.MCP_PROTOCOL_VERSION)
        self.sid = headers.get(p.MCP_SESSION_ID)
        self.name = headers.get(p.SESSION_KEY_HEADER)  # the route has no {name} on /mcp
        self.block = client_fields(request.raw_headers)  # the client's headers that go upstream
        self.last: _SameBody | None = None  # this client's last body, but for its id


_SAME_BODY_MAX = 64 * 1024  # larger bodies (a long prompt) are parsed every time
_ID_KEY = re.compile(rb'"id"[ \t\r\n]*:[ \t\r\n]*([0-9]+)')


class _SameBody:
    """A client's last body and what the express path read from it, to take the next body
    that is the same bytes but for the request's id without parsing it again: a client calls
    the same tool the same way over and over, and only the id changes. The id must be the
    body's one `"id"` key, a plain integer; a body that matches is the same JSON object but
    for that integer, so it means the same (method, params, era, session key)."""

    __slots__ = ("era", "key", "method", "params", "prefix", "suffix")

    def __init__(self, prefix: bytes, suffix: bytes, msg: Message, era: str, key: str) -> None:
        self.prefix = prefix  # up to the id's digits
        self.suffix = suffix  # after them
        self.method = msg.method
        self.params = msg.params
        self.era = era
        self.key = key  # the stateless session's key ("" in the handshake era)

    @classmethod
    def of(cls, body: bytes, msg: Message, era: str, key: str) -> _SameBody | None:
        rid = msg.id
        if type(rid) is not int or len(body) > _SAME_BODY_MAX or body.count(b'"id"') != 1:
            return None
        found = _ID_KEY.search(body)
        if found is None or int(found[1]) != rid:
            return None
        return cls(body[: found.start(1)], body[found.end(1) :], msg, era, key)

    def match(self, body: bytes) -> Message | None:
        """The message `body` holds if it is this body with another id, else None."""
        prefix, suffix = self.prefix, self.suffix
        end = len(body) - len(suffix)
        if not (body.startswith(prefix) and body.endswith(suffix)):
            return None
        digits = body[len(prefix) : end]
        if not digits.isdigit() or len(digits) > 15 or (digits[0] == 48 and len(digits) > 1):
            return None  # not a plain JSON integer (a leading zero is not JSON)
        return Message(id=int(digits), method=self.method, params=self.params)


def _derived(proxy: Proxy, handler: Any, request: FastRequest) -> _Derived | None:
    memo = handler._fast_memo
    if memo is not None and (memo.key is request.memo_key or memo.key == request.memo_key):
        return memo  # type: ignore[no-any-return]
    try:
        memo = _Derived(proxy, request)
    except (ExaiError, ValueError):
        return None  # refused (Origin, token, a header value): the full path says why
    handler._fast_memo = memo
    return memo


def start(proxy: Proxy, handler: Any, request: FastRequest) -> Express | None:
    """Send `request` to its session's instance now, or None (nothing sent, no state changed)
    when anything about it needs the proxy's full path."""
    started = time.perf_counter()
    said = _derived(proxy, handler, request)
    body = request.content.data
    if said is None or not said.json or len(body) > proxy.max_body_bytes:
        return None
    principal, version = said.principal, said.version
    last = said.last
    msg = last.match(body) if last is not None else None
    if msg is not None and last is not None:
        era, key = last.era, last.key
    else:
        try:
            msg = parse_message(body)
            era = era_of(version, msg)
        except ExaiError:
            return None  # the full path refuses it, in its own words
        if msg.method == "subscriptions/listen":
            return None  # a held stream (router/streams.py)
        key = ""
        if era == "stateless":
            key = key_of(principal, said.name, msg.client_name() or "", request)  # type: ignore[arg-type]
        said.last = _SameBody.of(body, msg, era, key)
    table = proxy.table
    sess: Session | None
    if era == "stateless":
        sess = table.by_key.get(key)
        if sess is None or sess.ended:
            return None
    else:
        sid = said.sid
        sess = table.by_id.get(sid) if sid is not None else None
        if sess is None or sess.ended or sess.principal != principal or sess.era != "handshake":
            return None
        if version and version != sess.protocol_version:
            sess.protocol_version = version
    target = proxy.bindings.targets.get(sess.id)
    if target is None or target.id != sess.instance_id:
        return None
    try:
        data = proxy._request_head(request, sess, target, body, False, said.block, True)  # type: ignore[arg-type]
    except ExaiError:
        return None
    generation = sess.generation
    sent = time.perf_counter()
    upstream = proxy.relay.send_now(target.host, target.port, data, proxy.read_timeout)
    if upstream is None:
        return None
    # From here on the call is out: the same bookkeeping as Proxy._forward.
    express = Express(proxy, handler, request, sess, msg, body, target, generation, upstream, started, sent)
    sess.inflight += 1
    sess.calls[id(express.call)] = express.call
    sess.total += 1
    sess.routed_here = True
    table.touch(sess)
    upstream.notify = express.on_upstream
    return express


def _call_of(msg: Message) -> Call:
    name = (msg.params or {}).get("name") if msg.method == "tools/call" else None
    return Call(method=msg.method or "response", name=name if isinstance(name, str) else "", task=None)


class Express:
    """One call in flight on the express path (see the module's doc)."""

    __slots__ = (
        "answered", "blocked", "body", "call", "done", "fields", "generation", "handler", "held",
        "msg", "pending", "proxy", "request", "sent", "sess", "sse", "started", "streaming",
        "target", "upstream", "watch",
    )  # fmt: skip

    def __init__(
        self,
        proxy: Proxy,
        handler: Any,
        request: FastRequest,
        sess: Session,
        msg: Message,
        body: bytes,
        target: Instance,
        generation: int,
        upstream: Response,
        started: float,
        sent: float,
    ) -> None:
        self.proxy = proxy
        self.handler = handler
        self.request = request
        self.sess = sess
        self.msg = msg
        self.body = body
        self.target = target
        self.generation = generation
        self.upstream = upstream
        self.started = started
        self.sent = sent
        self.answered = 0.0
        self.fields = b""  # the answer's header lines to relay (Proxy's _answer_fields)
        self.done = False
        self.streaming = False  # a chunked answer is being copied (SSE)
        self.sse = False
        self.pending = b""  # a chunked answer's head, until it goes with the first piece
        self.held: asyncio.TimerHandle | None = None  # sends `pending` if no piece comes soon
        self.watch: ResponseWatch | None = None  # finds the response's event in an SSE answer
        self.blocked = False  # the client's connection is full: copying waits for it to drain
        self.call = _call_of(msg)
        self.call.task = self  # type: ignore[assignment]  # cancel() below: a scale-down's cut

    # --- the upstream answer ---------------------------------------------------------------
    def on_upstream(self, timed_out: bool) -> None:
        """The upstream connection read something, lost the connection or stayed silent."""
        if self.done:
            return
        try:
            self._on_upstream(timed_out)
        except Exception:  # a bug: never leave the client waiting on a call nobody follows
            log.exception("express path: POST /mcp failed")
            if not self.done:
                self._client_left()

    def _on_upstream(self, timed_out: bool) -> None:
        if self.streaming:
            self._stream(timed_out)
            return
        up = self.upstream
        if timed_out:
            if up.error is None:
                up.error = Lost(f"nothing for {self.proxy.read_timeout:g}s", silent=True)
            self._hand_over()
            return
        if up.error is not None:
            self._hand_over()  # lost: the proxy decides (re-send, rebind, error body)
            return
        if not up.status:
            self._wait()  # for the rest of the headers
            return
        if not self.answered:
            self.answered = time.perf_counter()
            kind = self._kind()
            if kind is None:
                self._hand_over()
                return
            if kind == "stream":
                self._start_stream()
                return
        if not up.complete:
            self._wait()  # for the rest of the body
            return
        self._finish()

    def _wait(self) -> None:
        """A new wait of at most EXAI_UPSTREAM_READ_TIMEOUT of silence (as Response._wait)."""
        timeout = self.proxy.read_timeout
        if timeout:
            self.upstream.conn.watch(timeout)

    def _kind(self) -> str | None:
        """How the proxy would relay this answer, as it came (no retry, no refusal): "whole"
        (one write) or "stream" (chunked, as it arrives); None when the proxy must see it."""
        up, sess = self.upstream, self.sess
        status = up.status
        if status == 409 or (status == 404 and sess.upstream_sid):
            return None  # fenced, or the instance lost the session: the proxy moves it
        sid = sess.id if sess.era == "handshake" else None
        self.fields, ctype, length = _answer_fields(up, sid, bool(sess.upstream_sid))
        if status >= 400 and not is_jsonrpc_type(ctype):
            return None  # a refusal the proxy words
        if status in (204, 304):
            return "whole"
        if length is not None and length <= JSON_WHOLE_MAX and ctype.startswith("application/json"):
            return "whole" if length <= _JSON_WHOLE_MAX else None
        self.sse = ctype.startswith("text/event-stream")
        if self.sse and self.msg.is_request:
            self.watch = ResponseWatch(self.msg.id)
        return "stream"

    def _finish(self) -> None:
        """Write the whole answer to the client in one write and give the connection back."""
        self.done = True
        proxy, up, request = self.proxy, self.upstream, self.request
        up.notify = None
        data = prebuilt.whole_bytes(up.status, up.reason, self.fields, up.take())
        transport = self.handler.transport
        keep = transport is not None and not transport.is_closing()
        if keep:
            transport.write(data)  # the call is over: no writer's output_size to keep
        now = time.perf_counter()
        proxy._observe(request, self.started, now)  # type: ignore[arg-type]
        proxy._stages(self.started, self.sent, self.answered, now)
        up.release()
        self._end()
        self.handler._express_done(keep)

    # --- a chunked answer (SSE), copied as it arrives ---------------------------------------
    def _start_stream(self) -> None:
        """The head goes with the first piece: at once when one is already here, else when it
        comes, or alone after HEAD_HOLD seconds (the client should see that its call runs). The
        SDK sends an SSE answer's head alone, its first event a fraction of a millisecond later:
        one write to the client instead of two."""
        proxy, up = self.proxy, self.upstream
        self.streaming = True
        self.pending = prebuilt.stream_head(up.status, up.reason, self.fields)
        if not up.has_data:
            self.held = self.handler._loop.call_later(HEAD_HOLD, self._send_head)
        proxy._observe(self.request, self.started)  # type: ignore[arg-type]
        proxy._stages(self.started, self.sent, self.answered)
        self._stream()

    def _send_head(self) -> None:
        """HEAD_HOLD passed and no piece came: the head goes alone."""
        self.held = None
        if self.done or not self.pending:
            return
        head, self.pending = self.pending, b""
        if not self._write(head):
            self._client_left()

    def _unhold(self) -> None:
        if self.held is not None:
            self.held.cancel()
            self.held = None

    def _stream(self, timed_out: bool = False) -> None:
        up = self.upstream
        if self.blocked:
            return  # the client reads slower than the instance writes: on with it when it drains
        if up._chunks:
            data = up.take()
            if up.complete:  # the last piece goes with the end marker, in one write
                self._end_stream(prebuilt.chunk(data) + prebuilt.END)
                return
            watch = self.watch
            cut = watch.feed(data) if watch is not None else None
            if cut is not None:
                # The response's event is here: the client's answer ends with it (the instance
                # ends its stream next; its end is read in the background).
                self._end_stream(prebuilt.chunk(data[:cut]) + prebuilt.END, data[cut:])
                return
            self._unhold()
            head, self.pending = self.pending, b""
            if not self._write(head + prebuilt.chunk(data)):
                self._client_left()
                return
        if up.complete:
            self._end_stream(prebuilt.END)
            return
        if timed_out and up.error is None:
            up.error = Lost(f"nothing for {self.proxy.read_timeout:g}s", silent=True)
        if up.error is not None:
            self._lost_midstream(up.error)
            return
        self._wait()

    def _lost_midstream(self, error: BaseException | None) -> None:
        """The proxy's handling of an instance lost (or silent) in the middle of an answer:
        an SSE error event for a request, the end marker, and a check of the instance."""
        proxy, sess, target, msg = self.proxy, self.sess, self.target, self.msg
        proxy.metrics.upstream_errors.inc(kind="lost-midstream")
        log.warning("instance %s dropped a response for session %s: %r", target.id, sess.id[:8], error)
        tail = b""
        if msg.is_request and self.sse:
            if isinstance(error, Lost) and error.silent:
                lost = _lost(target, error, proxy.read_timeout)
            else:
                lost = InstanceLost(f"Instance {target.id} stopped while handling this request.")
            tail = prebuilt.chunk(sse_error_event(lost, msg.id))
        proxy._spawn(proxy.bindings.check_and_rebind(sess, sess.generation, target))
        self._end_stream(tail + prebuilt.END)

    def _end_stream(self, tail: bytes, extra: bytes | None = None) -> None:
        """Send the rest of the answer and its end; the connection goes back when read to its
        end (`extra`: the response has come, the rest of the instance's answer is read after)."""
        self.done = True
        self._unhold()
        up = self.upstream
        up.notify = None
        head, self.pending = self.pending, b""
        keep = self._write(head + tail)
        if extra is not None and keep:
            up.drain(extra)
        elif up.at_eof:
            up.release()
        else:
            up.close()  # never return a half-read connection to the pool
        self._end()
        self.handler._express_done(keep)

    def _client_left(self) -> None:
        """A write found the client gone: closing upstream tells the instance to cancel."""
        self.done = True
        self._unhold()
        self.upstream.notify = None
        self.upstream.close()
        self._end()
        self.handler._express_done(False)

    def _write(self, data: bytes) -> bool:
        transport = self.handler.transport
        if transport is None or transport.is_closing():
            return False
        if data:
            transport.write(data)
            self.request._payload_writer.output_size += len(data)
        return True

    def unblock(self) -> None:
        """The client's connection drained: copy what came meanwhile."""
        self.blocked = False
        if self.streaming and not self.done:
            self._stream()

    def _end(self) -> None:
        sess = self.sess
        sess.inflight -= 1
        sess.calls.pop(id(self.call), None)
        # The call is over and out of the session's list: nothing can cut it any more. Without
        # its link back here, this object and what it holds are freed at once instead of
        # waiting, a reference cycle, for the collector (a few objects every call).
        self.call.task = None
        self.proxy.table.touch(sess)

    def _hand_over(self) -> None:
        """The proxy's full path takes the call up from here, in a task."""
        self.done = True
        up = self.upstream
        up.notify = None
        taken = Sent(self.call, self.generation, self.target, self.sent, up)
        proxy, request, sess, msg, body, started = (
            self.proxy, self.request, self.sess, self.msg, self.body, self.started
        )  # fmt: skip
        self.handler._express_to_task(
            lambda _request: proxy.take_up(request, sess, body, msg, started, taken)  # type: ignore[arg-type]
        )

    # --- the call's end from outside ----------------------------------------------------------
    def cancel(self, msg: Any = None) -> bool:
        """A scale-down cut the call (`Call.cut` is set): the proxy answers it, in a task, or,
        once a streamed answer has begun, here as the proxy would (an SSE error event, the end)."""
        if self.done:
            return False
        if not self.streaming:
            self._hand_over()
            return True
        rid = self.msg.id
        tail = b""
        if self.sse and rid is not None:
            error = CallCut(
                f"The fleet was scaled down while this call ({self.call.describe()}) was running."
            )
            tail = prebuilt.chunk(sse_error_event(error, rid))
        self.upstream.close()
        self._end_stream(tail + prebuilt.END)
        return True

    def client_gone(self) -> None:
        """The client closed its connection: closing the upstream one cancels the call there."""
        if self.done:
            return
        self.done = True
        self._unhold()
        self.upstream.notify = None
        self.upstream.close()
        self._end()
