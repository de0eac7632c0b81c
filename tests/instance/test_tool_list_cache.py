"""`tools/list` from its caches (instance/tools/listing.py) is the SDK's own answer, in both eras.

In-process: two instance apps built by `build_app` (no Redis, no Postgres), one as it runs and
one with both caches taken out, are driven with the same hand-made requests; the answers must
be the same bytes (the 2026-07-28 JSON answer) or the same SSE event (the handshake era), for a
first listing, its repeats and the refusals of bad requests, and a changed tool set is listed
anew.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from common import protocol as p
from common.settings import load_settings
from instance.app import build_app
from instance.runtime import Identity
from instance.tools.listing import ListAnswers, ToolListCache
from tests.asgi import call_asgi

TOKEN = "listing-test-token"
MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


class App:
    """One instance app in-process, and requests to it as uvicorn would hand them over."""

    def __init__(self, *, cached: bool, **overrides: Any) -> None:
        settings = load_settings(
            internal_token=TOKEN, database_url=None, redis_url=None, log_level="WARNING", **overrides
        )
        self.gate, self.runtime = build_app(settings, Identity(id="listing-test", host="127.0.0.1", port=1))
        self.manager = self.gate.mcp_handler.__self__
        server = self.manager.app
        self.mcp = server.get_request_handler("tools/call").handler.__self__
        self.listing = next(m for m in server.middleware if isinstance(m, ToolListCache))
        self.answers = self.gate.answers
        assert isinstance(self.answers, ListAnswers)
        if not cached:
            server.middleware.remove(self.listing)
            self.gate.answers = None
        self.session: str | None = None

    def headers(self, era: str, **extra: str) -> list[tuple[bytes, bytes]]:
        base = {
            "host": "127.0.0.1:1",
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
            p.INTERNAL_TOKEN_HEADER.lower(): TOKEN,
            p.SESSION_HEADER.lower(): "listing-session",
            p.ERA_HEADER.lower(): era,
        }
        if era == "stateless":
            base.update({"mcp-protocol-version": MODERN, "mcp-method": "tools/list"})
        else:
            base["mcp-protocol-version"] = HANDSHAKE
            if self.session:
                base[p.MCP_SESSION_ID.lower()] = self.session
        base.update({k.lower(): v for k, v in extra.items()})
        return [(k.encode(), v.encode()) for k, v in base.items()]

    async def request(
        self, headers: list[tuple[bytes, bytes]], body: Any
    ) -> tuple[int, dict[str, str], bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await call_asgi(self.gate, headers, data)

    async def initialize(self) -> None:
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "t"}},
        }
        status, headers, _ = await self.request(self.headers("handshake"), init)
        assert status == 200
        self.session = headers[p.MCP_SESSION_ID.lower()]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        await self.request(self.headers("handshake"), note)

    async def list(self, era: str, rid: Any, params: Any = None, **headers: str) -> tuple[int, str, bytes]:
        """(status, content type, the answer: a JSON body, or an SSE event's data)."""
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": "tools/list"}
        if params is not None:
            body["params"] = params
        elif era == "stateless":
            body["params"] = {"_meta": META}
        status, answer_headers, raw = await self.request(self.headers(era, **headers), body)
        kind = answer_headers.get("content-type", "")
        if kind.startswith("text/event-stream"):
            raw = next(line[6:] for line in raw.split(b"\r\n") if line.startswith(b"data: "))
        return status, kind, raw


@contextlib.asynccontextmanager
async def running(*, cached: bool, **overrides: Any) -> AsyncIterator[App]:
    app = App(cached=cached, **overrides)
    async with app.manager.run():
        app.runtime.set_state("ready")
        yield app


def _same_but_id(answer: bytes, rid: Any) -> bytes:
    """The answer with its JSON-RPC id put back to 1, to compare answers to different ids."""
    decoded = json.loads(answer)
    assert decoded["id"] == rid
    for spelled in (json.dumps(rid).encode(), json.dumps(rid, ensure_ascii=False).encode()):
        if b'"id":' + spelled in answer:
            return answer.replace(b'"id":' + spelled, b'"id":1', 1)
    raise AssertionError(f"no id {rid!r} in {answer[:100]!r}")


@pytest.mark.parametrize("era", ["stateless", "handshake"])
async def test_kept_listings_are_the_sdks_answer(era: str) -> None:
    async with running(cached=True) as cached, running(cached=False) as plain:
        if era == "handshake":
            await cached.initialize()
            await plain.initialize()
        expected = await plain.list(era, 1)
        assert expected[0] == 200
        assert json.loads(expected[2])["result"]["tools"]
        for rid in (1, 2, "req-3", 123456789012, "é"):
            status, kind, answer = await cached.list(era, rid)
            assert (status, kind) == expected[:2]
            assert _same_but_id(answer, rid) == expected[2]
        # The first listing was the SDK's; the repeats came from the caches.
        assert cached.listing.misses == 1
        assert cached.listing.hits + (cached.answers.hits if era == "stateless" else 0) == 4
        if era == "stateless":
            assert cached.answers.hits == 4  # the bytes themselves: the SDK not even asked
        assert plain.listing.hits == plain.listing.misses == 0


@pytest.mark.parametrize("era", ["stateless", "handshake"])
async def test_bad_requests_are_refused_as_before(era: str) -> None:
    bad: list[tuple[Any, dict[str, str]]] = [
        ({"_meta": {**META, "io.modelcontextprotocol/clientInfo": "nobody"}}, {}),
        ({"_meta": META, "cursor": 7}, {}),
        ({"_meta": META, "cursor": "abc"}, {}),
        ({"_meta": "nothing"}, {}),
        ({"_meta": {**META, "io.modelcontextprotocol/protocolVersion": "2099-01-01"}}, {}),
        ({"_meta": META}, {"mcp-method": "tools/call"}),
        ({"_meta": META}, {"accept": "text/html"}),
        ({"_meta": META}, {"content-type": "text/plain"}),
    ]
    async with running(cached=True) as cached, running(cached=False) as plain:
        if era == "handshake":
            await cached.initialize()
            await plain.initialize()
        assert (await cached.list(era, 1))[0] == 200  # a listing is kept
        for params, headers in bad:
            expected = await plain.list(era, 5, params, **headers)
            for _ in range(2):
                assert await cached.list(era, 5, params, **headers) == expected, (params, headers)
        assert _same_but_id((await cached.list(era, 6))[2], 6) == _same_but_id(
            (await plain.list(era, 6))[2], 6
        )


@pytest.mark.parametrize("era", ["stateless", "handshake"])
async def test_other_methods_pass_the_cache_by(era: str) -> None:
    async with running(cached=True) as app, running(cached=False) as plain:
        if era == "handshake":
            await app.initialize()
            await plain.initialize()
        params = {"_meta": META} if era == "stateless" else None
        ping: dict[str, Any] = {"jsonrpc": "2.0", "id": 9, "method": "ping"}
        if params:
            ping["params"] = params
        for _ in range(2):  # a ping, with the params of a listing, is answered as a ping
            status, _, answer = await app.request(app.headers(era, **{"mcp-method": "ping"}), ping)
            expected = await plain.request(plain.headers(era, **{"mcp-method": "ping"}), ping)
            assert (status, answer) == (expected[0], expected[2])
        listed = json.loads((await app.list(era, 1))[2])
        assert listed["result"]["tools"]
        assert app.listing.misses == 1


@pytest.mark.parametrize("era", ["stateless", "handshake"])
async def test_a_changed_tool_set_is_listed_anew(era: str) -> None:
    async with running(cached=True) as app:
        if era == "handshake":
            await app.initialize()

        def names(answer: bytes) -> set[str]:
            return {t["name"] for t in json.loads(answer)["result"]["tools"]}

        before = names((await app.list(era, 1))[2])
        assert names((await app.list(era, 2))[2]) == before

        async def probe_tool() -> str:
            """A tool added after the first listing."""
            return "probe"

        app.mcp.add_tool(probe_tool, name="probe_tool")
        assert names((await app.list(era, 3))[2]) == before | {"probe_tool"}
        assert names((await app.list(era, 4))[2]) == before | {"probe_tool"}
        app.mcp.remove_tool("probe_tool")
        assert names((await app.list(era, 5))[2]) == before


async def test_a_body_over_the_limit_is_refused_by_the_sdk_as_before() -> None:
    padded = {"_meta": {**META, "padding": "x" * 5000}}
    async with (
        running(cached=True, max_body_bytes=2000) as app,
        running(cached=False, max_body_bytes=2000) as plain,
    ):
        assert (await app.list("stateless", 1))[0] == 200
        expected = await plain.list("stateless", 2, padded)
        assert expected[0] == 413
        for _ in range(2):
            assert await app.list("stateless", 2, padded) == expected
