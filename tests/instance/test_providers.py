"""The provider layer against the fake provider over real HTTP: retries, limits, errors, streaming."""

from __future__ import annotations

import asyncio
import json
import time
from email.utils import formatdate

import pytest

from common.errors import (
    InvalidArgument,
    ProviderError,
    ProviderNotConfigured,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from common.settings import Settings, load_settings
from instance.providers import ChatRequest, Providers
from instance.providers.models import lookup, resolve
from instance.providers.retry import parse_retry_after
from tests.fakes.provider import Behaviour, FakeProvider


def _settings(fake: FakeProvider, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "glm_api_key": "k-glm",
        "glm_api_url": fake.glm_url,
        "kimi_api_key": "k-kimi",
        "kimi_api_url": fake.kimi_url,
        "provider_max_retries": 2,
        "provider_retry_budget": 6.0,
        "provider_read_timeout": 2.0,
        "provider_max_concurrency": 8,
    }
    values.update(overrides)
    return load_settings(**values)


def _request(model: str = "glm-4.6", *, stream: bool = True, text: str = "hello") -> ChatRequest:
    info = lookup(model)
    assert info is not None
    return ChatRequest(model=info, messages=[{"role": "user", "content": text}], stream=stream)


@pytest.mark.parametrize("model", ["glm-4.6", "kimi-k2-0905-preview"])
@pytest.mark.parametrize("stream", [True, False])
async def test_answer_and_usage_both_providers_streaming_or_not(
    fake: FakeProvider, model: str, stream: bool
) -> None:
    async with Providers.open(_settings(fake)) as providers:
        info, provider = providers.resolve(model)
        deltas: list[str] = []
        result = await provider.chat(_request(model, stream=stream, text="ping"), on_delta=deltas.append)
    assert "ping" in result.content and result.provider == info.provider
    assert result.tokens_in and result.tokens_out
    assert (len(deltas) > 1) == stream
    [hit] = fake.snapshot()
    assert hit.stream == stream and hit.model == model
    assert hit.auth == f"Bearer k-{info.provider}"
    assert hit.provider == info.provider


@pytest.mark.parametrize("stream", [True, False])
async def test_calls_one_after_another_reuse_one_connection(fake: FakeProvider, stream: bool) -> None:
    """A streamed answer is read to its end (past `[DONE]`), so its connection goes back to the
    pool: a chat does not open (for HTTPS: handshake) a new one each time."""
    async with Providers.open(_settings(fake)) as providers:
        _, provider = providers.resolve("glm-4.6")
        for n in range(3):
            result = await provider.chat(_request(stream=stream, text=f"call {n}"))
            assert f"call {n}" in result.content
    peers = {hit.peer for hit in fake.snapshot()}
    assert len(peers) == 1 and None not in peers, peers


async def test_stream_in_separate_chunks_over_time(fake: FakeProvider) -> None:
    """Events that arrive one by one (as a provider generating tokens sends them) are read as
    they come; the connection still goes back to the pool."""
    fake.script(Behaviour(chunk_delay=0.02, content="one two three four"), Behaviour(chunk_delay=0.02))
    async with Providers.open(_settings(fake)) as providers:
        _, provider = providers.resolve("glm-4.6")
        deltas: list[str] = []
        first = await provider.chat(_request(text="a"), on_delta=deltas.append)
        second = await provider.chat(_request(text="b"))
    assert first.content == "one two three four" and "".join(deltas) == first.content and len(deltas) > 1
    assert first.finish_reason == "stop" and first.tokens_in and first.tokens_out
    assert "b" in second.content
    assert len({hit.peer for hit in fake.snapshot()}) == 1


async def _raw_sse_server(pieces: list[bytes]) -> tuple[asyncio.Server, str]:
    """A server that answers every request with `pieces` as one chunked SSE body, each piece a
    chunk of its own, sent apart (so the client sees lines and characters split anywhere)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.005)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v4"


def _sse(*events: object) -> bytes:
    return b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\r\n\r\n" for e in events)


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
async def test_stream_split_anywhere_is_read_whole(size: int) -> None:
    """Lines, CRLF line ends and multi-byte characters split across reads; a comment line."""
    body = (
        b": keep-alive\r\n\r\n"
        + _sse(
            {"model": "glm-4.6", "choices": [{"delta": {"content": "héllo "}}]},
            {"model": "glm-4.6", "choices": [{"delta": {"content": "wörld 🙂"}}]},
            {
                "choices": [{"delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4},
            },
        )
        + b"data: [DONE]\r\n\r\n"
    )
    server, url = await _raw_sse_server([body[i : i + size] for i in range(0, len(body), size)])
    async with (
        server,
        Providers.open(load_settings(glm_api_key="k", glm_api_url=url, kimi_api_key="")) as providers,
    ):
        _, provider = providers.resolve("glm-4.6")
        deltas: list[str] = []
        result = await provider.chat(_request(), on_delta=deltas.append)
    assert result.content == "héllo wörld 🙂" and deltas == ["héllo ", "wörld 🙂"]
    assert (result.tokens_in, result.tokens_out, result.finish_reason) == (3, 4, "stop")


@pytest.mark.parametrize("bad", [b"data: {not json\n\n", b"data: [1, 2]\n\n", b'data: {"a": 1} x\n\n'])
async def test_malformed_stream_chunk_is_an_error_in_words(bad: bytes) -> None:
    server, url = await _raw_sse_server([_sse({"choices": [{"delta": {"content": "hi"}}]}) + bad])
    async with (
        server,
        Providers.open(load_settings(glm_api_key="k", glm_api_url=url, kimi_api_key="")) as providers,
    ):
        _, provider = providers.resolve("glm-4.6")
        with pytest.raises(ProviderError, match="malformed stream chunk"):
            await provider.chat(_request())


async def test_stream_without_done_ends_with_the_body() -> None:
    """A body that ends without `[DONE]` (its last line without a line end) is still the answer."""
    body = (
        _sse({"choices": [{"delta": {"content": "a"}}]}) + b'data: {"choices": [{"delta": {"content": "b"}}]}'
    )
    server, url = await _raw_sse_server([body])
    async with (
        server,
        Providers.open(load_settings(glm_api_key="k", glm_api_url=url, kimi_api_key="")) as providers,
    ):
        _, provider = providers.resolve("glm-4.6")
        result = await provider.chat(_request())
    assert result.content == "ab"


async def test_429_with_retry_after_is_retried_once_after_the_delay(fake: FakeProvider) -> None:
    fake.script(Behaviour(status=429, retry_after="1"))
    async with Providers.open(_settings(fake)) as providers:
        _, provider = providers.resolve("glm-4.6")
        result = await provider.chat(_request())
    hits = fake.snapshot()
    assert len(hits) == 2 and result.attempts == 2
    gap = hits[1].started - hits[0].started
    assert 0.9 <= gap < 3.0, gap


async def test_persistent_500_stops_at_max_retries_with_a_clear_error(fake: FakeProvider) -> None:
    fake.default = Behaviour(status=500)
    async with Providers.open(_settings(fake)) as providers:
        _, provider = providers.resolve("glm-4.6")
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable) as info:
            await provider.chat(_request())
    assert len(fake.snapshot()) == 3  # 1 + EXAI_PROVIDER_MAX_RETRIES, no storm
    assert time.monotonic() - started < 6.0
    assert "HTTP 500" in str(info.value) and info.value.details["attempts"] == 3


async def test_retry_after_beyond_the_budget_gives_up_at_once(fake: FakeProvider) -> None:
    fake.default = Behaviour(status=429, retry_after="30")
    async with Providers.open(_settings(fake)) as providers:
        _, provider = providers.resolve("kimi")
        with pytest.raises(ProviderRateLimited) as info:
            await provider.chat(_request("kimi-k2-0905-preview"))
    assert len(fake.snapshot()) == 1
    assert "retry budget" in str(info.value)


async def test_hanging_provider_times_out(fake: FakeProvider) -> None:
    fake.script(Behaviour(hang=True))
    async with Providers.open(_settings(fake, provider_read_timeout=0.5)) as providers:
        _, provider = providers.resolve("glm-4.6")
        with pytest.raises(ProviderTimeout):
            await provider.chat(_request())
    assert len(fake.snapshot()) == 1  # a timeout is not retried: the call may be running


async def test_rejected_key_is_not_retried(fake: FakeProvider) -> None:
    fake.script(Behaviour(status=401))
    async with Providers.open(_settings(fake)) as providers:
        _, provider = providers.resolve("glm-4.6")
        with pytest.raises(ProviderRejected) as info:
            await provider.chat(_request())
    assert "GLM_API_KEY" in str(info.value) and len(fake.snapshot()) == 1


async def test_unreachable_provider_is_unavailable(fake: FakeProvider) -> None:
    from tests.ports import free_port

    settings = _settings(
        fake, glm_api_url=f"http://127.0.0.1:{free_port()}/api/paas/v4", provider_retry_budget=1.0
    )
    async with Providers.open(settings) as providers:
        _, provider = providers.resolve("glm-4.6")
        with pytest.raises(ProviderUnavailable) as info:
            await provider.chat(_request())
    assert "GLM_API_URL" in str(info.value)


async def test_per_key_concurrency_limit(fake: FakeProvider) -> None:
    fake.default = Behaviour(delay=0.3)
    async with Providers.open(_settings(fake, provider_max_concurrency=2)) as providers:
        _, provider = providers.resolve("glm-4.6")
        await asyncio.gather(*(provider.chat(_request()) for _ in range(5)))
    assert fake.max_overlap() == 2


def test_model_resolution_and_auto() -> None:
    assert resolve("auto", configured=("glm", "kimi"), default_model="glm-4.6").name == "glm-4.6"
    assert resolve("auto", configured=("kimi",), default_model="glm-4.6").name == "kimi-k2-0905-preview"
    assert resolve("kimi-k2", configured=("kimi",), default_model="glm-4.6").name == "kimi-k2-0905-preview"
    assert resolve("glm-4.7", configured=("glm",), default_model="glm-4.6").provider == "glm"
    with pytest.raises(ProviderNotConfigured) as none:
        resolve("auto", configured=(), default_model="glm-4.6")
    assert "GLM_API_KEY" in str(none.value) and "KIMI_API_KEY" in str(none.value)
    with pytest.raises(ProviderNotConfigured) as kimi:
        resolve("kimi-k2-turbo-preview", configured=("glm",), default_model="glm-4.6")
    assert "KIMI_API_KEY" in str(kimi.value)
    with pytest.raises(InvalidArgument):
        resolve("gpt-5", configured=("glm",), default_model="glm-4.6")


def test_retry_after_parsing() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    assert 8 <= (parse_retry_after(formatdate(now + 10, usegmt=True), now=now) or 0) <= 10
    assert parse_retry_after(formatdate(now - 10, usegmt=True), now=now) == 0.0


def test_body_encoder_gives_the_json_of_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept messages come back byte for byte; anything not a plain role/content message is
    encoded as it is; the cache stays within its bounds."""
    from instance.providers.base import BodyEncoder

    encoder = BodyEncoder()
    monkeypatch.setattr(BodyEncoder, "CHARS", 500)
    odd = [
        {"role": "tool", "tool_call_id": "x", "content": "r"},
        {"role": "user", "content": [{"type": "text", "text": "ü"}]},
        {"content": "c", "role": "assistant"},
    ]
    for k in range(30):
        turns = [{"role": "user", "content": f"turn {n} " * 10 + 'é🙂\n"q"'} for n in range(k)]
        body = {
            "model": "glm-4.6",
            "messages": [*turns, *odd],
            "stream": True,
            "thinking": {"type": "enabled"},
        }
        assert json.loads(encoder.encode(body)) == body
        assert encoder._chars <= 500
    assert json.loads(encoder.encode({"messages": [{"role": "user", "content": "a"}]})) == {
        "messages": [{"role": "user", "content": "a"}]
    }
    assert json.loads(encoder.encode({"model": "m"})) == {"model": "m"}
