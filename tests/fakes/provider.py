"""A fake LLM provider: a real HTTP server on loopback speaking GLM's and Kimi's chat API.

Instances reach it through GLM_API_URL / KIMI_API_URL exactly as they would reach Z.ai or
Moonshot, so the whole HTTP path (pooling, streaming, timeouts, retries) is exercised. Tests
script what the next requests get (`script(Behaviour(...), ...)`, then `default`) and read
back every hit with its timing, which is how they count retries and measure overlap.

It runs uvicorn in a thread with its own event loop, so a test that blocks its own loop
cannot slow the provider down.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from instance.context.tokens import counter_for

GLM_PATH = "/api/paas/v4"
KIMI_PATH = "/v1"


@dataclass
class Behaviour:
    """What one request gets. Defaults: an immediate 200 echoing the last user message."""

    delay: float = 0.0
    status: int = 200
    retry_after: str | None = None
    hang: bool = False
    content: str | None = None
    chunk_delay: float = 0.0
    gate: threading.Event | None = None  # answer only once the test sets it (after any delay)


@dataclass
class Hit:
    provider: str
    model: str
    stream: bool
    auth: str
    body: dict[str, Any]
    started: float
    finished: float | None = None
    status: int = 0
    peer: int | None = None  # the client's port: one value per connection the client used
    # The fake's whole part, HTTP included: from the request's arrival (before its body is read
    # and parsed) to the answer's last chunk handed to the server (after `finished` when streamed).
    received: float | None = None
    sent: float | None = None
    # When the request's first bytes reached the fake's server (its HTTP parsing, ASGI and
    # routing before `received` included): a provider's own time starts as its server reads.
    arrived: float | None = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages") or [])


def _events(model: str, provider: str, text: str, usage: dict[str, int]) -> list[bytes]:
    """The answer as the provider's SSE events: the text in three deltas, then the finish (with
    the usage where that provider puts it), then [DONE]."""
    size = max(1, len(text) // 3)
    pieces = [text[i : i + size] for i in range(0, len(text), size)] or [""]
    events = [
        {"id": "fake-1", "model": model, "choices": [{"index": 0, "delta": {"content": piece}}]}
        for piece in pieces
    ]
    last: dict[str, Any] = {
        "id": "fake-1",
        "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    if provider == "kimi":
        last["choices"][0]["usage"] = usage  # Moonshot puts usage in the last choice
    else:
        last["usage"] = usage
    events.append(last)
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


class _SseAnswer(Response):
    """A streamed completion, chunked as the providers send it. With a chunk delay each event is
    a chunk of its own, that long apart; without one, the events are ready at once and go out
    as one chunk, the body's end with them (one write, as a server holding a whole answer sends
    it). `hit.sent` is stamped once the last byte is handed to the server: everything the fake
    spent on the request lies between `hit.received` and `hit.sent`."""

    media_type = "text/event-stream"

    def __init__(self, hit: Hit, events: list[bytes], chunk_delay: float) -> None:
        super().__init__(media_type=self.media_type)
        del self.headers["content-length"]  # no length: chunked, as the providers stream
        self.hit = hit
        self.events = events
        self.chunk_delay = chunk_delay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if self.chunk_delay:
            for event in self.events[:-1]:
                await send({"type": "http.response.body", "body": event, "more_body": True})
                await asyncio.sleep(self.chunk_delay)
            await send({"type": "http.response.body", "body": self.events[-1], "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"".join(self.events), "more_body": False})
        self.hit.sent = time.monotonic()


class ProviderUrls:
    """The URLs an instance is given for a fake listening on `host`:`port`."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def glm_url(self) -> str:
        return self.url + GLM_PATH

    @property
    def kimi_url(self) -> str:
        return self.url + KIMI_PATH


@dataclass
class FakeProvider(ProviderUrls):
    host: str = "127.0.0.1"
    port: int = 0
    default: Behaviour = field(default_factory=Behaviour)
    hits: list[Hit] = field(default_factory=list)
    max_active: int = 0
    _queue: list[Behaviour] = field(default_factory=list)
    _queues: dict[str, list[Behaviour]] = field(default_factory=dict)
    _active: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    # --- control from the test ---------------------------------------------------------------
    def script(self, *behaviours: Behaviour) -> None:
        """The next requests get these, in order; later ones get `default`."""
        with self._lock:
            self._queue.extend(behaviours)

    def script_for(self, provider: str, *behaviours: Behaviour) -> None:
        """The next requests to one provider ("glm" or "kimi") get these, before `script`'s."""
        with self._lock:
            self._queues.setdefault(provider, []).extend(behaviours)

    def reset(self, default: Behaviour | None = None) -> None:
        with self._lock:
            self._queue.clear()
            self._queues.clear()
            self.hits.clear()
            self.max_active = 0
            self.default = default or Behaviour()

    def snapshot(self) -> list[Hit]:
        with self._lock:
            return list(self.hits)

    def active(self) -> int:
        """Requests being answered right now."""
        with self._lock:
            return self._active

    def max_overlap(self) -> int:
        """Most requests that were being answered at the same moment."""
        return self.max_active

    # --- the server --------------------------------------------------------------------------
    def _next(self, provider: str) -> Behaviour:
        with self._lock:
            own = self._queues.get(provider)
            if own:
                return own.pop(0)
            return self._queue.pop(0) if self._queue else self.default

    async def _completions(self, request: Request) -> Response:
        received = time.monotonic()
        provider = "glm" if request.url.path.startswith(GLM_PATH) else "kimi"
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"message": "body is not JSON"}}, status_code=400)
        hit = Hit(
            provider=provider,
            model=str(body.get("model")),
            stream=bool(body.get("stream")),
            auth=request.headers.get("authorization", ""),
            body=body,
            started=time.monotonic(),
            peer=request.client.port if request.client else None,
            received=received,
            arrived=request.scope.get(ARRIVED_KEY, received),
        )
        behaviour = self._next(provider)
        with self._lock:
            self.hits.append(hit)
            self._active += 1
            self.max_active = max(self.max_active, self._active)
        try:
            if not hit.auth.startswith("Bearer ") or len(hit.auth) <= len("Bearer "):
                hit.status = 401
                return JSONResponse({"error": {"message": "missing API key"}}, status_code=401)
            if behaviour.hang:  # until the client gives up
                while not await request.is_disconnected():  # noqa: ASYNC110 - Starlette polls
                    await asyncio.sleep(0.05)
                hit.status = 499
                return Response(status_code=499)
            if behaviour.delay:
                await asyncio.sleep(behaviour.delay)
            # A threading.Event that the test sets from its own loop: polled, like `hang`.
            while behaviour.gate is not None and not behaviour.gate.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            hit.status = behaviour.status
            if behaviour.status >= 400:
                headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else {}
                return JSONResponse(
                    {"error": {"message": f"fake error {behaviour.status}", "code": str(behaviour.status)}},
                    status_code=behaviour.status,
                    headers=headers,
                )
            text = behaviour.content if behaviour.content is not None else _echo(body)
            counter = counter_for(hit.model, provider)  # the model's real tokenizer, as providers bill
            usage = {
                "prompt_tokens": counter.count_messages(hit.messages),
                "completion_tokens": counter.count(text) + 1,
            }
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            if hit.stream:
                return _SseAnswer(hit, _events(hit.model, provider, text, usage), behaviour.chunk_delay)
            return JSONResponse(
                {
                    "id": "fake-1",
                    "object": "chat.completion",
                    "model": hit.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        finally:
            hit.finished = time.monotonic()
            if not hit.stream or hit.status != 200:
                hit.sent = hit.finished
            with self._lock:
                self._active -= 1

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(GLM_PATH + "/chat/completions", self._completions, methods=["POST"]),
                Route(KIMI_PATH + "/chat/completions", self._completions, methods=["POST"]),
            ]
        )

    @contextmanager
    def running(self) -> Iterator[FakeProvider]:
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
        # and accepted sockets inherit it. Without it a reused keep-alive connection stalls
        # ~40 ms per answer (Nagle against the client's delayed ACK), as real servers do not.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(),
            http=_StampedProtocol,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        server.capture_signals = _no_signals  # type: ignore[method-assign]
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="fake-provider"
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("fake provider did not start")
            time.sleep(0.02)
        self._server, self._thread = server, thread
        try:
            yield self
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()


ARRIVED_KEY = "fake.arrived"


class _StampedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, stamping in each request's ASGI scope when the bytes that
    began it arrived (the server's own parsing, ASGI dispatch and routing then lie inside the
    fake's time, as they lie inside a real provider's)."""

    _chunk_at = 0.0

    def data_received(self, data: bytes) -> None:
        self._chunk_at = time.monotonic()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[ARRIVED_KEY] = self._chunk_at  # type: ignore[literal-required]


@contextmanager
def _no_signals() -> Iterator[None]:
    yield


def _echo(body: dict[str, Any]) -> str:
    messages = body.get("messages") or []
    last = next((m for m in reversed(messages) if m.get("role") == "user"), {"content": ""})
    content = last.get("content")
    text = content if isinstance(content, str) else json.dumps(content)
    return f"fake {body.get('model')} reply #{len(messages)} to: {text[:300]}"
