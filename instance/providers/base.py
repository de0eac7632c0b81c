"""An OpenAI-compatible chat-completions client: what GLM (Z.ai) and Kimi (Moonshot) share.

Each provider keeps its own keep-alive connections (instance/providers/http1.py: HTTP/1.1 on
asyncio protocols with httptools' C parser, one prebuilt block of bytes per request); an
`asyncio.Semaphore` caps concurrent requests per API key; the retry loop here is the only one.
Answers are streamed internally so a long answer never trips the read timeout and the caller
can report progress while tokens arrive. Through an HTTP(S) proxy (HTTPS_PROXY and the like,
NO_PROXY respected) the requests go through aiohttp's client instead, which speaks to proxies.

Why not httpx, nor aiohttp for every request: the provider call is on every chat's path.
httpx's layers (httpcore's pool and h11, anyio streams, its cookie and auth hooks) cost about
2 ms of CPU per streamed request on the development machine; aiohttp's client about 0.7 ms
more per call than http1.py (tests/bench/bench_provider_http.py). The body is encoded once,
and the headers are built once per provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

import aiohttp
import certifi

from common import jsonbytes
from common.errors import (
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from common.settings import Settings
from instance.providers import http1
from instance.providers.models import KEY_ENV, ModelInfo, ProviderName
from instance.providers.retry import backoff, parse_retry_after

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})

OnDelta = Callable[[str], None]

_DECODE = json.JSONDecoder().raw_decode


class _Body(Protocol):
    """An answer's body as it arrives (aiohttp's StreamReader, http1.Response)."""

    async def readany(self) -> bytes: ...

    def at_eof(self) -> bool: ...


class _Answer(Protocol):
    """What is read of an answer (aiohttp's ClientResponse, http1.Response)."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> _Body: ...


@dataclass
class ChatRequest:
    model: ModelInfo
    messages: list[dict[str, Any]]
    temperature: float | None = None
    thinking: bool | None = None
    web_search: bool = False
    max_tokens: int | None = None
    stream: bool = True


@dataclass
class ChatResult:
    content: str
    model: str
    provider: str
    tokens_in: int | None = None
    tokens_out: int | None = None
    finish_reason: str | None = None
    attempts: int = 1
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class ProviderStats:
    requests: int = 0
    upstream_hits: int = 0
    retries: int = 0
    failures: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


class _Retryable(Exception):
    """An attempt failed in a way worth repeating; `error` is what to raise if we stop."""

    def __init__(self, error: ProviderError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class OpenAICompatibleProvider:
    """Chat completions over one pooled client; subclasses add their provider's extras."""

    name: ClassVar[ProviderName]
    label: ClassVar[str]

    def __init__(
        self, *, base_url: str, api_key: str, settings: Settings, tls: ssl.SSLContext | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # Built off the event loop by Providers.open (tls_context reads the CA bundle from disk).
        self._tls = tls
        self._api_key = api_key
        self.max_concurrency = settings.provider_max_concurrency
        self.max_retries = settings.provider_max_retries
        self.retry_budget = settings.provider_retry_budget
        self.stats = ProviderStats()
        self._semaphore = asyncio.Semaphore(self.max_concurrency)
        self._waiting = 0
        self._active = 0
        self._connect_timeout = settings.provider_connect_timeout
        self._read_timeout = settings.provider_read_timeout
        self._headers = {
            "User-Agent": "exai-fleet",
            "Authorization": f"Bearer {api_key}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        self._url = f"{self.base_url}/chat/completions"
        self._proxy = _env_proxy(self._url)
        self._http: aiohttp.ClientSession | None = None  # through a proxy: opened on first use
        self._direct: http1.Connections | None = None  # without one: made on first use
        self.through_aiohttp = self._proxy is not None
        """Whether requests go through aiohttp's client (to speak to a proxy) or http1.py's."""
        self._body = BodyEncoder()

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.max_concurrency,
                    limit_per_host=0,
                    keepalive_timeout=30.0,
                    ssl=self._tls if self._tls is not None else True,
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    # Waiting for a pooled connection and connecting (the semaphore keeps the
                    # pool from being the wait), then the connect itself, then each read.
                    connect=self._read_timeout,
                    sock_connect=self._connect_timeout,
                    sock_read=self._read_timeout,
                ),
                headers=self._headers,
                skip_auto_headers=("User-Agent",),
                # Not trust_env: it looks the proxy and netrc up again on worker threads for
                # every request; the proxy is looked up once here instead (_env_proxy).
                trust_env=False,
                raise_for_status=False,
                auto_decompress=True,
            )
        return self._http

    def _connections(self) -> http1.Connections:
        if self._direct is None:
            try:
                self._direct = http1.Connections(
                    self._url,
                    self._headers,
                    tls=self._tls,
                    connect_timeout=self._connect_timeout,
                    read_timeout=self._read_timeout,
                )
            except ValueError as exc:
                raise ProviderRejected(
                    f"{self.label} cannot be called: {exc}",
                    hint=f"Check {self._url_env()} and {KEY_ENV[self.name]}.",
                ) from None
        return self._direct

    async def aclose(self) -> None:
        if self._direct is not None:
            self._direct.close()
        if self._http is not None:
            await self._http.close()

    # --- what differs between providers ----------------------------------------------------
    def payload(self, request: ChatRequest) -> tuple[dict[str, Any], list[str]]:
        """The JSON body for `request`, plus notes about options this provider ignored."""
        body: dict[str, Any] = {"model": request.model.name, "messages": request.messages}
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body, []

    # --- the call --------------------------------------------------------------------------
    def limits(self) -> dict[str, Any]:
        return {
            "provider": self.name,
            "base_url": self.base_url,
            "max_concurrency": self.max_concurrency,
            "active": self._active,
            "waiting": self._waiting,
            "max_retries": self.max_retries,
            "retry_budget_s": self.retry_budget,
            "requests": self.stats.requests,
            "upstream_hits": self.stats.upstream_hits,
            "retries": self.stats.retries,
            "failures": self.stats.failures,
            "tokens_in": self.stats.tokens_in,
            "tokens_out": self.stats.tokens_out,
        }

    async def chat(self, request: ChatRequest, on_delta: OnDelta | None = None) -> ChatResult:
        """One chat completion, retried on 429/5xx/connect errors within the retry budget."""
        body, notes = self.payload(request)
        data = self._body.encode(body)  # once, for every attempt
        loop = asyncio.get_running_loop()
        started = loop.time()
        clock = time.perf_counter()  # the call's duration (uvloop's loop.time() is in whole ms)
        deadline = started + self.retry_budget
        self.stats.requests += 1
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self._limited_attempt(data, bool(body.get("stream")), request, on_delta)
            except _Retryable as exc:
                delay = exc.retry_after if exc.retry_after is not None else backoff(attempt)
                if attempt > self.max_retries or loop.time() + delay > deadline:
                    self.stats.failures += 1
                    exc.error.details["attempts"] = attempt
                    if attempt <= self.max_retries:
                        exc.error.message += f" (a retry in {delay:.1f}s would exceed the retry budget)"
                    raise exc.error from None
                self.stats.retries += 1
                log.info("%s: %s; retry %d in %.2fs", self.label, exc.error.message, attempt, delay)
                await asyncio.sleep(delay)
                continue
            except ProviderError:
                self.stats.failures += 1
                raise
            result.attempts = attempt
            result.seconds = time.perf_counter() - clock
            result.notes.extend(notes)
            if result.tokens_in:
                self.stats.tokens_in += result.tokens_in
            if result.tokens_out:
                self.stats.tokens_out += result.tokens_out
            return result

    async def _limited_attempt(
        self, data: bytes, stream: bool, request: ChatRequest, on_delta: OnDelta | None
    ) -> ChatResult:
        """One upstream hit under the per-key limit; the limit is not held while backing off."""
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1
        self._active += 1
        try:
            return await self._attempt(data, stream, request, on_delta)
        finally:
            self._active -= 1
            self._semaphore.release()

    async def _attempt(
        self, data: bytes, stream: bool, request: ChatRequest, on_delta: OnDelta | None
    ) -> ChatResult:
        self.stats.upstream_hits += 1
        if not self.through_aiohttp:
            return await self._attempt_direct(data, stream, request, on_delta)
        received_any = False
        try:
            async with self._session().post(
                self._url, data=data, allow_redirects=False, proxy=self._proxy
            ) as response:
                if response.status >= 400:
                    payload = await response.read()
                    raise self._status_error(response, payload, request)
                received_any = True
                if stream:
                    return await self._read_stream(response, request, on_delta)
                return self._parse_full(await response.read(), request)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Nothing was sent: worth repeating.
            raise _Retryable(
                ProviderUnavailable(
                    f"{self.label} could not be reached at {self.base_url} ({type(exc).__name__})",
                    hint=f"Check the network and {self._url_env()}.",
                )
            ) from None
        except TimeoutError as exc:
            raise ProviderTimeout(
                f"{self.label} did not answer in time ({type(exc).__name__})",
                hint="The provider is slow or hanging; retry, or raise EXAI_PROVIDER_READ_TIMEOUT.",
            ) from None
        except aiohttp.ClientError as exc:  # disconnected, broken payload, socket errors
            error = ProviderUnavailable(
                f"{self.label} dropped the connection ({type(exc).__name__})",
                hint="Retry the call; if it keeps happening the provider is having trouble.",
            )
            if received_any:
                raise error from None
            raise _Retryable(error) from None

    async def _attempt_direct(
        self, data: bytes, stream: bool, request: ChatRequest, on_delta: OnDelta | None
    ) -> ChatResult:
        """One request on the provider's own connections (no proxy), the same errors as above."""
        try:
            response = await self._connections().post(data)
        except http1.ConnectFailed as exc:
            raise _Retryable(
                ProviderUnavailable(
                    f"{self.label} could not be reached at {self.base_url} ({exc})",
                    hint=f"Check the network and {self._url_env()}.",
                )
            ) from None
        except TimeoutError:
            raise self._timed_out() from None
        except http1.Dropped as exc:  # nothing came back: worth repeating
            raise _Retryable(self._dropped(exc)) from None
        try:
            if response.status >= 400:
                raise self._status_error(response, await response.read(), request)
            if stream:
                return await self._read_stream(response, request, on_delta)
            return self._parse_full(await response.read(), request)
        except TimeoutError:
            raise self._timed_out() from None
        except http1.Dropped as exc:
            raise self._dropped(exc) from None
        finally:
            response.release()

    def _timed_out(self) -> ProviderTimeout:
        return ProviderTimeout(
            f"{self.label} did not answer in time (no data for {self._read_timeout:g} s)",
            hint="The provider is slow or hanging; retry, or raise EXAI_PROVIDER_READ_TIMEOUT.",
        )

    def _dropped(self, exc: Exception) -> ProviderUnavailable:
        return ProviderUnavailable(
            f"{self.label} dropped the connection ({exc})",
            hint="Retry the call; if it keeps happening the provider is having trouble.",
        )

    def _url_env(self) -> str:
        return "GLM_API_URL" if self.name == "glm" else "KIMI_API_URL"

    def _status_error(self, response: _Answer, payload: bytes, request: ChatRequest) -> Exception:
        status = response.status
        detail = _error_text(payload, response.reason)
        if status in RETRY_STATUSES:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if status == 429:
                return _Retryable(
                    ProviderRateLimited(
                        f"{self.label} is rate-limiting requests (HTTP 429: {detail})",
                        hint="Wait a little and retry, or lower the number of concurrent calls.",
                        status=status,
                    ),
                    retry_after,
                )
            return _Retryable(
                ProviderUnavailable(
                    f"{self.label} failed with HTTP {status} ({detail})",
                    hint="The provider is having trouble; retry later or use a model of the other provider.",
                    status=status,
                ),
                retry_after,
            )
        if status in (401, 403):
            return ProviderRejected(
                f"{self.label} rejected the API key (HTTP {status}: {detail})",
                hint=f"Check {KEY_ENV[self.name]}.",
                status=status,
            )
        return ProviderRejected(
            f"{self.label} rejected the request for {request.model.name} (HTTP {status}: {detail})",
            hint="Check the model name and the size of the prompt and files.",
            status=status,
        )

    def _parse_full(self, payload: bytes, request: ChatRequest) -> ChatResult:
        try:
            data = json.loads(payload)
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise ProviderError(f"{self.label} sent an answer that is not a chat completion") from None
        usage = data.get("usage") or {}
        return ChatResult(
            content=content,
            model=str(data.get("model") or request.model.name),
            provider=self.name,
            tokens_in=usage.get("prompt_tokens"),
            tokens_out=usage.get("completion_tokens"),
            finish_reason=choice.get("finish_reason"),
        )

    async def _read_stream(
        self, response: _Answer, request: ChatRequest, on_delta: OnDelta | None
    ) -> ChatResult:
        """The answer's SSE events, read as whole buffers rather than line by line: a provider
        holding a whole answer sends it in one chunk, and one read, one split and a JSON parse
        per event cost far less than a coroutine step per line."""
        parts: list[str] = []
        usage: dict[str, Any] = {}
        finish: str | None = None
        model = request.model.name
        content = response.content
        pending = b""  # a line not yet ended by b"\n"
        done = ended = False
        while not (done or ended):
            data = await content.readany()  # what is buffered, at least one byte; b"" at the end
            if data:
                if pending:
                    data = pending + data
                cut = data.rfind(b"\n") + 1
                pending, block = data[cut:], data[:cut]
            else:  # the body ended: its last line, if it has no line end
                ended = True
                block, pending = pending, b""
            for raw in block.split(b"\n"):
                if not raw.startswith(b"data:"):
                    continue
                line = raw[5:].strip()
                if line == b"[DONE]":
                    done = True
                    break
                chunk = self._chunk(line)
                model = chunk.get("model") or model
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    text = delta.get("content")
                    if text:
                        parts.append(text)
                        if on_delta is not None:
                            on_delta(text)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                    if choice.get("usage"):  # Kimi reports usage inside the last choice
                        usage = choice["usage"]
        if done and not content.at_eof():  # the body's end is still to come after [DONE]
            await _drain(content)
        return ChatResult(
            content="".join(parts),
            model=str(model),
            provider=self.name,
            tokens_in=usage.get("prompt_tokens"),
            tokens_out=usage.get("completion_tokens"),
            finish_reason=finish,
        )

    def _chunk(self, line: bytes) -> dict[str, Any]:
        """One event's JSON object (raw_decode skips json.loads' encoding sniffing and checks)."""
        try:
            text = line.decode()
            chunk, end = _DECODE(text)
        except ValueError:  # UnicodeDecodeError included
            chunk, end = None, 0
        if not isinstance(chunk, dict) or end != len(text):
            raise ProviderError(f"{self.label} sent a malformed stream chunk")
        return chunk


def _dumps(value: Any) -> bytes:
    return jsonbytes.dumps(value)  # compact, UTF-8


class BodyEncoder:
    """A request body as JSON, each message's JSON kept for the next call: a thread's turns go
    out again with every call, unchanged, and encoding them was most of the body's cost (about
    60 us for a 20-turn thread of 20k characters). The look-up hashes each content string once
    (a string caches its hash; prompt assembly has hashed the stored turns already). An LRU,
    bounded in entries and characters; used on the event loop only."""

    ENTRIES = 4096
    CHARS = 1_000_000  # of content; the JSON kept is about as big again

    def __init__(self) -> None:
        self._messages: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._chars = 0

    def encode(self, body: dict[str, Any]) -> bytes:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return _dumps(body)
        head = _dumps({k: v for k, v in body.items() if k != "messages"})  # b"{...}"
        kept = self._messages
        parts: list[bytes] = []
        for message in messages:  # (inline: a call per message cost as much as short ones save)
            if type(message) is dict and len(message) == 2:
                role, content = message.get("role"), message.get("content")
                if type(role) is str and type(content) is str:
                    key = (role, content)
                    found = kept.get(key)
                    if found is None:
                        found = self._keep(key)
                    else:
                        kept.move_to_end(key)
                    parts.append(found)
                    continue
            parts.append(_dumps(message))
        listed = b'"messages":[' + b",".join(parts) + b"]}"
        return head[:-1] + (b"," + listed if len(head) > 2 else listed)

    def _keep(self, key: tuple[str, str]) -> bytes:
        role, content = key
        encoded = _dumps({"role": role, "content": content})
        self._messages[key] = encoded
        self._chars += len(content)
        while len(self._messages) > self.ENTRIES or self._chars > self.CHARS:
            (_, old), _ = self._messages.popitem(last=False)
            self._chars -= len(old)
        return encoded


def _env_proxy(url: str) -> str | None:
    """The proxy HTTP(S)_PROXY / ALL_PROXY name for `url`, unless NO_PROXY exempts its host
    (what httpx did by default); read once per provider, the environment does not change."""
    parts = urlsplit(url)
    # the environment's NO_PROXY only: proxy_bypass() may ask the OS (macOS) and resolve the host
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # untyped in typeshed
    if parts.hostname is None or bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies_environment()
    return proxies.get(parts.scheme) or proxies.get("all") or None


def tls_context() -> ssl.SSLContext:
    """Certificate checks as httpx made them: certifi's bundle, unless SSL_CERT_FILE or
    SSL_CERT_DIR names the machine's own (OpenSSL reads those). Reads files: call it off the
    event loop."""
    if os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


DRAIN_S = 0.5
"""How long a finished stream may take to end after `[DONE]` before its connection is dropped."""


async def _drain(content: _Body) -> None:
    """Read what follows `[DONE]` (the chunked body's end): a response left unread makes aiohttp
    close its connection, and the next call would open (and for HTTPS, handshake) a new one."""
    with contextlib.suppress(TimeoutError, aiohttp.ClientError, http1.Dropped):
        async with asyncio.timeout(DRAIN_S):
            while await content.readany():
                pass


def _error_text(payload: bytes, reason: str | None) -> str:
    """The provider's own error message, short, without echoing anything secret."""
    try:
        data = json.loads(payload)
    except ValueError:
        text = payload.decode(errors="replace").strip()
        return text[:200] or (reason or "")
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:200]
        if isinstance(err, str):
            return err[:200]
        if data.get("message"):
            return str(data["message"])[:200]
    return reason or ""
