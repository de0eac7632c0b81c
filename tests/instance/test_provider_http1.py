"""The provider calls' own HTTP/1.1 client (instance/providers/http1.py) against real servers on
loopback: TLS, keep-alive and its loss, bodies framed every way, compression, drops; and the
aiohttp path (kept for proxies) giving the same answers as the direct one."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from common.errors import ProviderRejected, ProviderTimeout, ProviderUnavailable
from common.eventloop import loop_factory
from common.settings import Settings, load_settings
from instance.providers import ChatRequest, Providers
from instance.providers.models import lookup
from tests.fakes.provider import Behaviour, FakeProvider

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]
"""Answers the request just read (its number on the connection from 0); False closes the connection."""

ANSWER = {
    "model": "glm-4.6",
    "choices": [{"message": {"role": "assistant", "content": "héllo"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 3},
}
SSE = (
    b'data: {"model":"glm-4.6","choices":[{"delta":{"content":"a"}}]}\n\n'
    b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)


def _request(*, stream: bool = True) -> ChatRequest:
    info = lookup("glm-4.6")
    assert info is not None
    return ChatRequest(model=info, messages=[{"role": "user", "content": "hi"}], stream=stream)


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


class RawServer:
    """A loopback HTTP/1.1 server whose answers the test writes byte by byte."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/v4"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while (request := await _read_request(reader)) is not None:
                self.requests.append(request)
                if not await self.handler(reader, writer, n):
                    break
                n += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # the test's loop ending with the connection open
            pass
        finally:
            writer.close()


def _json_answer(body: bytes, *extra: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        + b"".join(h + b"\r\n" for h in extra)
        + b"\r\n"
        + body
    )


def _settings(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "glm_api_key": "k",
        "glm_api_url": url,
        "kimi_api_key": "",
        "provider_max_retries": 2,
        "provider_retry_budget": 5.0,
        "provider_read_timeout": 2.0,
    }
    values.update(overrides)
    return load_settings(**values)


async def _chat(url: str, *, stream: bool = True, aiohttp: bool = False, **overrides: object) -> object:
    async with Providers.open(_settings(url, **overrides)) as providers:
        _, provider = providers.resolve("glm-4.6")
        provider.through_aiohttp = aiohttp
        return await provider.chat(_request(stream=stream))


@pytest.mark.parametrize("aiohttp", [False, True], ids=["http1", "aiohttp"])
@pytest.mark.parametrize("stream", [True, False])
async def test_both_clients_give_the_same_answer(fake: FakeProvider, aiohttp: bool, stream: bool) -> None:
    fake.script(Behaviour(status=503), Behaviour(content="the answer"))
    async with Providers.open(_settings(fake.glm_url)) as providers:
        _, provider = providers.resolve("glm-4.6")
        provider.through_aiohttp = aiohttp
        result = await provider.chat(_request(stream=stream))
        again = await provider.chat(_request(stream=stream))
    assert result.content == "the answer" and result.attempts == 2
    assert again.content and again.attempts == 1
    hits = fake.snapshot()
    assert hits[-1].auth == "Bearer k" and hits[-1].stream is stream
    assert len({h.peer for h in hits}) == 1  # one kept-alive connection for all three requests


@pytest.mark.parametrize("aiohttp", [False, True], ids=["http1", "aiohttp"])
async def test_a_hanging_provider_times_out_on_either_client(fake: FakeProvider, aiohttp: bool) -> None:
    fake.script(Behaviour(hang=True))
    with pytest.raises(ProviderTimeout, match="did not answer in time"):
        await _chat(fake.glm_url, aiohttp=aiohttp, provider_read_timeout=0.4)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    yield cert, key


def _server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def test_https_with_the_certificate_checked(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(_json_answer(json.dumps(ANSWER).encode()))
        await writer.drain()
        return True

    async with RawServer(answer, tls=_server_tls(cert, key)) as server:
        # Not trusted: refused before anything is sent, said so.
        with pytest.raises(ProviderUnavailable, match=r"could not be reached.*CERTIFICATE_VERIFY_FAILED"):
            await _chat(server.url, stream=False, provider_max_retries=0)
        assert server.requests == []
        # Trusted through SSL_CERT_FILE (instance/providers/base.tls_context): answered, kept alive.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        async with Providers.open(_settings(server.url)) as providers:
            _, provider = providers.resolve("glm-4.6")
            first = await provider.chat(_request(stream=False))
            second = await provider.chat(_request(stream=False))
        port = server.url.split(":")[2].split("/")[0]
    assert first.content == second.content == "héllo" and first.tokens_out == 3
    assert len(server.requests) == 2 and server.connections == 1  # the refused handshake not counted
    head = server.requests[0].split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("POST /v4/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{port}" in head
    assert "Authorization: Bearer k" in head


async def test_bodies_framed_by_length_chunks_or_close_and_compressed() -> None:
    plain = json.dumps(ANSWER).encode()
    packed = gzip.compress(plain)
    answers = [
        _json_answer(packed, b"content-encoding: gzip"),
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (SSE[:10], SSE[10:]))
        + b"0\r\n\r\n",
        # no length, not chunked: the body ends with the connection
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n" + plain,
    ]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        reply = answers.pop(0)
        writer.write(reply)
        await writer.drain()
        return b"connection: close" not in reply

    async with RawServer(answer) as server:
        async with Providers.open(_settings(server.url)) as providers:
            _, provider = providers.resolve("glm-4.6")
            gzipped = await provider.chat(_request(stream=False))
            chunked = await provider.chat(_request(stream=True))
            until_close = await provider.chat(_request(stream=False))
            assert answers == []
            answers.append(_json_answer(plain))
            after_close = await provider.chat(_request(stream=False))  # on a new connection
    assert gzipped.content == until_close.content == after_close.content == "héllo"
    assert chunked.content == "a" and chunked.tokens_out == 2
    assert server.connections == 2


async def test_a_kept_alive_connection_the_server_closed_is_replaced_without_a_retry() -> None:
    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(_json_answer(json.dumps(ANSWER).encode()))  # keep-alive, then closed anyway
        await writer.drain()
        return False

    async with RawServer(answer_then_close) as server:
        async with Providers.open(_settings(server.url)) as providers:
            _, provider = providers.resolve("glm-4.6")
            first = await provider.chat(_request(stream=False))
            await asyncio.sleep(0.05)  # the server's close reaches the client
            second = await provider.chat(_request(stream=False))
    assert first.attempts == second.attempts == 1
    assert server.connections == 2 and len(server.requests) == 2


async def test_a_connection_dropped_mid_answer_is_an_error_in_words_not_retried() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 5000\r\n\r\n" + SSE[:30]
        )
        await writer.drain()
        return False

    async with RawServer(half) as server:
        with pytest.raises(
            ProviderUnavailable, match=r"dropped the connection .*closed before its answer's body"
        ):
            await _chat(server.url)
    assert len(server.requests) == 1  # the answer had begun: it may have run, not sent again


async def test_unasked_encodings_and_broken_http_are_errors_in_words() -> None:
    replies = [
        _json_answer(b"xx", b"content-encoding: br"),
        b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n",
    ]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(replies.pop(0) if replies else _json_answer(json.dumps(ANSWER).encode()))
        await writer.drain()
        return True

    async with RawServer(answer) as server:
        with pytest.raises(ProviderUnavailable, match="encoded as 'br'"):
            await _chat(server.url, stream=False, provider_max_retries=0)
        with pytest.raises(ProviderUnavailable, match=r"not valid HTTP/1\.1"):
            await _chat(server.url, stream=False, provider_max_retries=0)


async def test_a_key_with_a_line_break_is_refused_before_anything_is_sent(fake: FakeProvider) -> None:
    with pytest.raises(ProviderRejected, match=r"line break.*GLM_API_KEY"):
        await _chat(fake.glm_url, glm_api_key="k\r\nX-Injected: 1")
    assert fake.snapshot() == []


async def test_a_cancelled_call_closes_its_connection_and_the_next_call_gets_a_new_one() -> None:
    answered, closed = asyncio.Event(), asyncio.Event()

    async def slow_then_quick(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 0 and not answered.is_set():
            answered.set()
            await reader.read()  # no answer: the client goes away first (its close ends this read)
            closed.set()
            return False
        writer.write(_json_answer(json.dumps(ANSWER).encode()))
        await writer.drain()
        return True

    async with RawServer(slow_then_quick) as server:
        async with Providers.open(_settings(server.url)) as providers:
            _, provider = providers.resolve("glm-4.6")
            call = asyncio.create_task(provider.chat(_request(stream=False)))
            await answered.wait()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.wait_for(closed.wait(), 5)  # the cancelled call's connection was closed
            assert provider._direct is not None and provider._direct.idle() == 0
            result = await provider.chat(_request(stream=False))
    assert result.content == "héllo" and server.connections == 2


def test_the_client_on_the_fleets_event_loop(fake: FakeProvider, certificate: tuple[Path, Path]) -> None:
    """Instances run on uvloop (common/eventloop.py), whose transports are not asyncio's classes:
    plain and TLS connections, kept alive, a cancelled call, on that loop."""
    factory = loop_factory()
    if factory is None:  # pragma: no cover - uvloop is a dependency on Linux
        pytest.fail("uvloop is not installed; the fleet's processes would run on asyncio's loop")
    cert, key = certificate

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(_json_answer(gzip.compress(json.dumps(ANSWER).encode()), b"content-encoding: gzip"))
        await writer.drain()
        return True

    async def calls() -> None:
        fake.script(Behaviour(hang=True))
        async with Providers.open(_settings(fake.glm_url)) as providers:
            _, provider = providers.resolve("glm-4.6")
            hanging = asyncio.create_task(provider.chat(_request()))
            await asyncio.sleep(0.2)
            hanging.cancel()
            with pytest.raises(asyncio.CancelledError):
                await hanging
            results = [await provider.chat(_request(stream=stream)) for stream in (True, False, True)]
        assert all(r.content and r.attempts == 1 for r in results)
        async with RawServer(answer, tls=_server_tls(cert, key)) as server:
            os.environ["SSL_CERT_FILE"] = str(cert)
            try:
                async with Providers.open(_settings(server.url)) as providers:
                    _, provider = providers.resolve("glm-4.6")
                    tls = [await provider.chat(_request(stream=False)) for _ in range(2)]
            finally:
                del os.environ["SSL_CERT_FILE"]
        assert [r.content for r in tls] == ["héllo", "héllo"] and server.connections == 1

    with asyncio.Runner(loop_factory=factory) as runner:
        loop = runner.get_loop()
        assert not isinstance(loop, asyncio.BaseEventLoop)  # uvloop's, not asyncio's
        runner.run(calls())
    hits = fake.snapshot()
    assert len(hits) == 4 and len({h.peer for h in hits[1:]}) == 1  # after the cancelled call: one kept
